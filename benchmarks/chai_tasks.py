"""The accuracy side of `benchmarks.chai`: held-out text, the next-line multiple-choice task, and one
compiled program that scores tokens with or without CHAI.

**Text.** The held-out modules of the standard library (`inference.chai_dump.code_documents`, the
split training holds out) are divided in two: even-numbered documents are calibration text, odd ones
evaluation text, so no measured token was seen by the calibration.

**Next-token accuracy and perplexity**: the evaluation documents' tokens, concatenated and cut into
windows of `seq_len`; every position is scored.

**Multiple choice**: choose the true next line of held-out code among four. An item takes a line
(at least 12 characters once stripped, occurring once in its module, after at least 8 lines), its
preceding lines as context (the last `seq_len - OPTION_TOKENS` tokens of up to 40 lines), and three
other distinct lines of the same module as distractors, the four in a seeded random order. Each
option is scored as the mean log-probability of its tokens after the context (length-normalized:
summed log-likelihood would favour short lines). The option text begins with the newline that ends
the context's last line, so context + option is the module's own text, tokenized at a line break.

**CHAI inside the program.** `token_scores` computes each row's plans from its own first 5 tokens
(`inference.chai_generate.prefix_plans`) and runs the forward pass under them, in one jitted
function; all four options of an item share their context's first tokens, hence its plans.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inference.chai_generate import PlanSpec, prefix_plans
from jaxmodels.chai import FIRST_TOKENS
from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, forward

OPTION_TOKENS = 48  # longest option kept (tokens); a row is context + option
MIN_LINE_CHARS = 12
MIN_CONTEXT_LINES = 8
MAX_CONTEXT_LINES = 40

__all__ = ["split_documents", "text_windows", "Item", "next_line_items", "item_rows", "token_scores",
           "scorer", "score_windows", "score_items"]


def split_documents() -> tuple[list[str], list[str]]:
    """(calibration documents, evaluation documents) of the held-out stdlib split."""
    from inference.chai_dump import code_documents

    docs = code_documents()
    return docs[0::2], docs[1::2]


def text_windows(tokenizer: Any, docs: list[str], num_tokens: int, seq_len: int) -> np.ndarray:
    """[N, seq_len] int32 windows over the documents' concatenated tokens, N = num_tokens // seq_len
    (at least 1), encoding only the documents needed."""
    want, pieces, have = max(num_tokens // seq_len, 1) * seq_len, [], 0
    for text in docs:
        pieces.append(np.asarray(tokenizer.encode(text), np.int32))
        have += len(pieces[-1])
        if have >= want:
            break
    stream = np.concatenate(pieces)
    n = min(want, len(stream)) // seq_len
    if n == 0:
        raise ValueError(f"the evaluation text holds fewer than {seq_len} tokens")
    return stream[: n * seq_len].reshape(n, seq_len)


class Item(NamedTuple):
    context: list[int]  # token ids
    options: list[list[int]]  # four token lists
    answer: int  # index of the true next line


def _eligible(lines: list[str]) -> list[int]:
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [i for i, line in enumerate(lines) if len(line.strip()) >= MIN_LINE_CHARS and counts[line] == 1]


def _item(tokenizer: Any, lines: list[str], i: int, pool: list[int], rng: np.random.Generator,
          context_tokens: int) -> Item | None:
    others = [j for j in pool if j != i]
    if len(others) < 3:
        return None
    picks = [i] + [int(j) for j in rng.choice(others, 3, replace=False)]
    order = rng.permutation(4)
    options = [tokenizer.encode("\n" + lines[picks[k]], add_special_tokens=False) for k in order]
    if max(len(o) for o in options) > OPTION_TOKENS:
        return None
    context = tokenizer.encode("\n".join(lines[max(0, i - MAX_CONTEXT_LINES):i]), add_special_tokens=False)
    context = context[-context_tokens:]
    if len(context) < FIRST_TOKENS:
        return None
    return Item(context, options, int(np.flatnonzero(order == 0)[0]))


def next_line_items(tokenizer: Any, docs: list[str], count: int, seq_len: int, seed: int = 0) -> list[Item]:
    """Up to `count` items, taken round-robin over the documents (one new line per document per
    round), seeded."""
    rng, items, pools = np.random.default_rng(seed), [], []
    for doc in docs:
        lines = doc.splitlines()
        pool = _eligible(lines)
        pools.append((lines, [i for i in pool if i >= MIN_CONTEXT_LINES], pool))
    while len(items) < count and any(targets for _, targets, _ in pools):
        for lines, targets, pool in pools:
            if len(items) < count and targets:
                i = targets.pop(int(rng.integers(len(targets))))
                item = _item(tokenizer, lines, i, pool, rng, seq_len - OPTION_TOKENS)
                items += [] if item is None else [item]
    return items


def item_rows(items: list[Item], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [4N, seq_len] right-padded, option mask [4N, seq_len - 1]: True where the log-prob of
    position j + 1 belongs to the option)."""
    tokens = np.zeros((4 * len(items), seq_len), np.int32)
    mask = np.zeros((4 * len(items), seq_len - 1), bool)
    for n, item in enumerate(items):
        c = len(item.context)
        for k, option in enumerate(item.options):
            row = tokens[4 * n + k]
            row[:c], row[c:c + len(option)] = item.context, option
            mask[4 * n + k, c - 1:c - 1 + len(option)] = True
    return tokens, mask


def token_scores(params: Params, tokens: jax.Array, *, config: LlamaConfig, spec: PlanSpec | None
                 ) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T] -> (log-probability of each next token [B, T-1], top-1 hit [B, T-1]). With a
    `spec`, each row runs under CHAI plans from its first 5 tokens, planned in this same program."""
    plans = None
    if spec is not None:
        lengths = jnp.full((tokens.shape[0],), FIRST_TOKENS, jnp.int32)
        plans = prefix_plans(params, tokens[:, :FIRST_TOKENS], lengths, config=config, spec=spec)
    logits, _ = forward(params, config, tokens, plan=plans)
    logits, target = logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[..., None], axis=-1)[..., 0]
    return logp, jnp.argmax(logits, axis=-1) == target


def scorer(config: LlamaConfig, spec: PlanSpec | None):
    """`token_scores` compiled for one model and mode."""
    return jax.jit(functools.partial(token_scores, config=config, spec=spec))


def _batched(score, params: Params, tokens: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Score rows in batches of `batch` (the last padded with copies of row 0, then dropped)."""
    n = len(tokens)
    pad = (-n) % batch
    padded = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)]) if pad else tokens
    outs = [jax.device_get(score(params, jnp.asarray(padded[i:i + batch]))) for i in range(0, len(padded), batch)]
    return np.concatenate([o[0] for o in outs])[:n], np.concatenate([o[1] for o in outs])[:n]


def score_windows(score, params: Params, windows: np.ndarray, batch: int) -> dict[str, float]:
    """Next-token accuracy and perplexity over every position of the windows."""
    logp, hit = _batched(score, params, windows, batch)
    return {"accuracy": float(hit.mean()), "perplexity": float(np.exp(-logp.mean()))}


def score_items(score, params: Params, items: list[Item], seq_len: int, batch: int) -> float:
    """Multiple-choice accuracy: the option with the highest mean token log-probability."""
    tokens, mask = item_rows(items, seq_len)
    logp, _ = _batched(score, params, tokens, batch)
    per_option = (logp * mask).sum(axis=1) / mask.sum(axis=1)
    chosen = per_option.reshape(len(items), 4).argmax(axis=1)
    return float(np.mean(chosen == np.array([item.answer for item in items])))

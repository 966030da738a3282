"""CHAI calibration data: the calibration text, and every layer's attention probabilities on it.

**Text** (`--texts`, default `code chat`), each source cut into windows of `max_tokens` tokens
(document by document, a document's tail shorter than a window dropped; the sources and the
documents are interleaved round-robin so any sample count mixes them):
- `code`: the held-out modules of the Python standard library: the same documents training holds
  out (`training.corpus.load_corpus("stdlib", DataSection.heldout_percent)`, its stable split by
  name hash), each encoded as the tokenizer encodes a prompt (BOS added if the tokenizer adds one).
- `chat`: prose in the model's chat template: sections of the Python language reference that ship
  with Python (`pydoc_data.topics`, sorted by name) as answers in conversations of three turns, the
  user asking "What does the Python reference say about '<topic>'?" and the assistant answering with
  the section's first 1,200 characters; rendered with the tokenizer's chat template (without one:
  the same questions and answers as plain text).
- a path: that file's text as one document.

**Probabilities without touching the model.** One jitted pass `run_layers(..., collect_hidden=True)`
gives every layer's input; each layer's q and k are then recomputed from it with the public pieces
(`rms_norm`, `dense`, RoPE), mirroring `jaxmodels.model._qkv`, and turned into causal softmax
probabilities [B, H, T, T] (tested against transformers' eager attention). Only each sample's
[H, H] Gram matrix of the flattened probabilities is kept (all k-means needs, see
`inference.chai_kmeans`), so memory stays at one layer's probabilities.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxmodels.config import LlamaConfig
from jaxmodels.layers import apply_rope, dense, rms_norm, rope_cos_sin, rope_inverse_frequencies
from jaxmodels.model import Params, embed_tokens, run_layers
from jaxmodels.params import layer_pieces

SOURCES = ("code", "chat")
CHAT_TURNS = 3
ANSWER_CHARS = 1200

__all__ = ["SOURCES", "describe_sources", "code_documents", "chat_documents", "source_documents",
           "calibration_windows", "layer_weights", "layer_qk", "attention_probs", "layer_probs",
           "head_grams"]


# --------------------------------------------------------------------------- text
def describe_sources(sources: Sequence[str]) -> str:
    """One line per source saying what text it is (recorded in the calibration file)."""
    text = {"code": "held-out Python standard-library modules (training.corpus stdlib split)",
            "chat": f"Python language-reference sections (pydoc_data.topics) as assistant answers in "
                    f"{CHAT_TURNS}-turn conversations, rendered with the model's chat template"}
    return "; ".join(text.get(s, f"the file {s}") for s in sources)


def code_documents() -> list[str]:
    """The stdlib modules training holds out (see the module docstring)."""
    from training.config import DataSection
    from training.corpus import load_corpus

    return list(load_corpus("stdlib", DataSection().heldout_percent).heldout)


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, text.strip()[:ANSWER_CHARS]) for name, text in sorted(topics.items()) if text.strip()]


def chat_documents(tokenizer: Any) -> list[str]:
    """Conversations of `CHAT_TURNS` question/answer turns over the reference sections, rendered."""
    topics, docs = _topics(), []
    for i in range(0, len(topics) - CHAT_TURNS + 1, CHAT_TURNS):
        messages = []
        for name, text in topics[i:i + CHAT_TURNS]:
            messages += [{"role": "user", "content": f"What does the Python reference say about '{name}'?"},
                         {"role": "assistant", "content": text}]
        if tokenizer.chat_template is not None:
            docs.append(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        else:
            docs.append("\n\n".join(m["content"] for m in messages))
    return docs


def source_documents(source: str, tokenizer: Any) -> list[list[int]]:
    """One source's documents as token ids."""
    if source == "code":
        return [tokenizer.encode(text) for text in code_documents()]
    if source == "chat":
        plain = tokenizer.chat_template is None
        return [tokenizer.encode(text, add_special_tokens=plain) for text in chat_documents(tokenizer)]
    return [tokenizer.encode(Path(source).read_text(encoding="utf-8"))]


def _windows(documents: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Window r of every document, for r = 0, 1, ... (documents round-robin)."""
    out, r = [], 0
    while True:
        got = [ids[r * max_tokens:(r + 1) * max_tokens] for ids in documents if len(ids) >= (r + 1) * max_tokens]
        if not got:
            return out
        out += got
        r += 1


def calibration_windows(tokenizer: Any, sources: Sequence[str], samples: int, max_tokens: int) -> np.ndarray:
    """Up to `samples` windows [N, max_tokens] int32, taking from the sources in turn."""
    per_source = [_windows(source_documents(s, tokenizer), max_tokens) for s in sources]
    picked, i = [], 0
    while len(picked) < samples and any(i < len(w) for w in per_source):
        picked += [w[i] for w in per_source if i < len(w)]
        i += 1
    return np.asarray(picked[:samples], np.int32).reshape(-1, max_tokens)


# --------------------------------------------------------------------------- probabilities
def layer_weights(params: Params, layer: int) -> Params:
    """One layer's weights as a dict of unstacked arrays (any layout: stacked, segments, per layer)."""
    (part, stacked), = layer_pieces(params["layers"], layer, layer + 1)
    return jax.tree_util.tree_map(lambda p: p[0], part) if stacked else part


def layer_qk(lp: Params, config: LlamaConfig, x: jax.Array, positions: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """A layer's q [B, T, H, hd] and k [B, KV, T, hd] (RoPE applied) from its input x [B, T, D]:
    the same computation as `jaxmodels.model._qkv`, from public pieces."""
    b, t, _ = x.shape
    hd, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inverse_frequencies(config)))
    xn = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    q = apply_rope(dense(lp["wq"], xn).reshape(b, t, nh, hd), cos, sin)
    k = apply_rope(dense(lp["wk"], xn).reshape(b, t, nkv, hd), cos, sin)
    return q, k.transpose(0, 2, 1, 3)


def attention_probs(q: jax.Array, k: jax.Array) -> jax.Array:
    """Causal softmax(q k^T / sqrt(hd)) in float32: q [B, T, H, hd], k [B, KV, T, hd] -> [B, H, T, T]."""
    b, t, h, hd = q.shape
    kh = jnp.repeat(k.astype(jnp.float32), h // k.shape[1], axis=1)  # [B, H, T, hd]
    scores = jnp.einsum("bqhd,bhkd->bhqk", q.astype(jnp.float32), kh,
                        precision=jax.lax.Precision.HIGHEST) * (hd ** -0.5)
    causal = jnp.tril(jnp.ones((t, t), bool))
    return jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)


@functools.partial(jax.jit, static_argnums=1)
def layer_inputs(params: Params, config: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> every layer's input hidden state [L, B, T, D]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h0 = embed_tokens(params, tokens)
    _, _, hidden = run_layers(params, config, h0, positions, collect_hidden=True)
    return jnp.concatenate([h0[None], hidden[:-1]])


def layer_probs(lp: Params, config: LlamaConfig, x: jax.Array) -> jax.Array:
    """One layer's attention probabilities [B, H, T, T] from its input x [B, T, D]."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return attention_probs(*layer_qk(lp, config, x, positions))


@functools.partial(jax.jit, static_argnums=1)
def _layer_gram(lp: Params, config: LlamaConfig, x: jax.Array) -> jax.Array:
    p = layer_probs(lp, config, x)
    return jnp.einsum("bhqk,bgqk->bhg", p, p, precision=jax.lax.Precision.HIGHEST)  # [B, H, H]


def _batches(windows: np.ndarray, batch_size: int) -> Iterable[tuple[np.ndarray, int]]:
    """(tokens [batch_size, T], real rows): the last batch padded with copies (one compiled shape)."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)
        yield np.concatenate([chunk, pad]), len(chunk)


def head_grams(params: Params, config: LlamaConfig, windows: np.ndarray, batch_size: int = 4,
               progress: bool = True) -> np.ndarray:
    """Per layer and sample, the Gram matrix of the heads' flattened attention probabilities:
    [L, N, H, H] float64."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    L, H = config.num_hidden_layers, config.num_attention_heads
    layers = [layer_weights(params, layer) for layer in range(L)]
    batch_size = min(batch_size, len(windows))
    out = np.zeros((L, len(windows), H, H))
    bar = tqdm(total=L * -(-len(windows) // batch_size), desc="attention scores", unit="layer",
               disable=None if progress else True, file=sys.stderr, leave=False)
    done = 0
    with bar:
        for tokens, rows in _batches(windows, batch_size):
            inputs = layer_inputs(params, config, jnp.asarray(tokens))
            for layer in range(L):
                out[layer, done:done + rows] = np.asarray(_layer_gram(layers[layer], config, inputs[layer]))[:rows]
                bar.update(1)
            done += rows
    return out

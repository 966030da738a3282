"""Choose the exit layer E and draft length d for self-speculation from a short calibration pass.

One teacher-forced forward over calibration tokens gives, for every exit E, the rate alpha_E at
which the early exit's argmax agrees with the final layer's (the greedy acceptance probability of
one draft). The cost model (DESIGN.md section 4, memory-bound decoding) then scores every (E, d):

    tokens per round  = (1 - alpha^(d+1)) / (1 - alpha)
    cost per round    = d * (E + h) + E + (L - E) * verify(d) + h      [in layer passes]
    speed-up          = tokens per round * (L + h) / cost per round

where h is the LM head's cost in layer passes (weight bytes of the head / bytes of one layer) and
verify(d) the relative cost of running d+1 tokens through a layer at once (1 when memory-bound).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.speculative import SpecConfig
from jaxmodels.config import LlamaConfig
from jaxmodels.model import Params, embed_tokens, exit_logits, run_layers


@dataclasses.dataclass(frozen=True)
class SpecChoice:
    exit_layer: int
    draft_len: int
    expected_speedup: float
    agreement: tuple[float, ...]  # alpha_E for E = 1 .. L-1

    def spec(self, adaptive: bool = True) -> SpecConfig:
        """Fixed: d = the modeled best. Adaptive: start there, free to grow to 2x (at least 4)."""
        if not adaptive:
            return SpecConfig(self.exit_layer, self.draft_len, adaptive=False)
        cap = min(max(2 * self.draft_len, 4), 16)
        return SpecConfig(self.exit_layer, cap, adaptive=True, start_draft_len=self.draft_len)


def exit_agreement(params: Params, config: LlamaConfig, sequences: Sequence[Sequence[int]],
                   starts: Sequence[int] | None = None) -> np.ndarray:
    """alpha[E-1] = fraction of positions where exit-E argmax == final argmax, for E = 1..L-1,
    counting positions >= starts[i] of sequence i (all positions when starts is None)."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    valid = np.zeros((len(sequences), width), bool)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], valid[i, starts[i] if starts else 0: len(s)] = s, True

    @jax.jit
    def agreement(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        _, _, hidden = run_layers(params, config, embed_tokens(params, tokens), positions,
                                  collect_hidden=True)  # [L, B, T, D]
        final = jnp.argmax(exit_logits(params, config, hidden[-1]), axis=-1)
        # one exit at a time: never materializes [L, B, T, V] logits
        return jax.lax.map(lambda h: jnp.argmax(exit_logits(params, config, h), -1) == final, hidden[:-1])

    agree = np.asarray(agreement(params, jnp.asarray(tokens)))  # [L-1, B, T]
    return (agree & valid).sum(axis=(1, 2)) / valid.sum()


def expected_speedup(alpha: float, exit_layer: int, draft_len: int, num_layers: int,
                     head_cost: float, verify_cost: float = 1.0) -> float:
    """The cost model above for one (E, d)."""
    d, E, L = draft_len, exit_layer, num_layers
    alpha = min(alpha, 0.999999)
    tokens = (1 - alpha ** (d + 1)) / (1 - alpha)
    cost = d * (E + head_cost) + E + (L - E) * verify_cost + head_cost
    return tokens * (L + head_cost) / cost


def head_cost_in_layers(config: LlamaConfig) -> float:
    """Bytes of the LM head over bytes of one layer's weights (both read once per pass)."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    d, f = config.hidden_size, config.intermediate_size
    layer = d * (2 * q + 2 * kv) + 3 * d * f
    return config.vocab_size * d / layer


def builtin_calibration_text(chars: int = 2000) -> str:
    """A fixed sample of Python standard-library source, present on every machine."""
    import json.decoder
    return inspect.getsource(json.decoder)[:chars]


def greedy_continuations(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]],
                         new_tokens: int = 48) -> list[list[int]]:
    """Each prompt followed by the model's own greedy continuation.

    Self-speculation drafts along the model's greedy output, where exit agreement can differ a lot
    from agreement on natural text (measured on a LayerSkip model: 0.45 at exit 1 on held-out code,
    under 0.01 along its greedy output), so calibration teacher-forces this text instead.
    """
    from inference.engine import generate
    prompts = [list(p[: config.max_position_embeddings - new_tokens]) for p in prompts]
    out = generate(params, config, prompts, new_tokens, eos_token_ids=())
    return [p + t for p, t in zip(prompts, out.tokens)]


def choose_exit_and_draft(params: Params, config: LlamaConfig, sequences: Sequence[Sequence[int]],
                          max_draft: int = 12, continue_greedy: int = 48) -> SpecChoice:
    """The (E, d) with the best modeled speed-up on these calibration sequences (each extended by
    `continue_greedy` tokens of the model's own greedy output; 0 to use them as they are)."""
    starts = None
    if continue_greedy:  # count only the greedy part: that is the text drafts are checked on
        kept = config.max_position_embeddings - continue_greedy  # prompts are cut to this length
        starts = [max(min(len(s), kept) - 1, 0) for s in sequences]  # predicts the 1st new token
        sequences = greedy_continuations(params, config, sequences, continue_greedy)
    alpha = exit_agreement(params, config, sequences, starts)
    h, L = head_cost_in_layers(config), config.num_hidden_layers
    best = max(((expected_speedup(alpha[E - 1], E, d, L, h), E, d)
                for E in range(1, L) for d in range(1, max_draft + 1)))
    return SpecChoice(exit_layer=best[1], draft_len=best[2], expected_speedup=best[0],
                      agreement=tuple(float(a) for a in alpha))

"""How pipeline stages hand activations to the next stage (`training.pipeline`), plain or AC-SGD.

A hand-off is `handoff(y, memory, slots) -> (received, memory)`, called by every stage at every
pipeline iteration inside `shard_map` (y [b, T, D] goes from stage s to s+1, S-1 to 0):

  ring    a plain `ppermute` of y (its dtype: float32 unless the model computes in bf16).
  acsgd   AC-SGD (`training.acsgd.handoff`): the 4-bit change of each example's activation since
          its last pass, against per-example memory that both sides keep; 8-bit gradients back.

AC-SGD's memory on a device: (send, recv), each [V, M, b, T, D] (float16 by default, as the
reference keeps it): `send[r, m]` is the sender-side copy for the micro-batch m it sends after its
chunk of repeat r, `recv[r, m]` the receiver-side copy of what enters its chunk of repeat r. The
pipeline says which slots an iteration uses (`slots`); slots of idle iterations are left alone.
Both copies are rounded to the memory dtype in the same way, so they stay bitwise equal.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from training import acsgd as acsgd_codec

Handoff = Callable[[jax.Array, Any, tuple], tuple[jax.Array, Any]]


def ring_perm(stages: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % stages) for i in range(stages)]


def ring(stages: int) -> Handoff:
    """The uncompressed hand-off: one `ppermute` of y per iteration."""
    perm = ring_perm(stages)

    def handoff(y, memory, slots):
        return jax.lax.ppermute(y, "stage", perm), memory

    return handoff


def acsgd(stages: int, fwd_bits: int = 4, bwd_bits: int | None = 8, exact: bool = False) -> Handoff:
    """AC-SGD's hand-off. `exact` (a separate compiled program) sends y itself and fills the memory:
    the step of any batch holding an example on its first pass."""
    perm = ring_perm(stages)

    def handoff(y, memory, slots):
        send, recv = memory
        (r, m, sending), (rr, mr, receiving) = slots
        old_send, old_recv = send[r, m], recv[rr, mr]
        received, new_send, new_recv = acsgd_codec.handoff(
            y, old_send.astype(y.dtype), old_recv.astype(y.dtype), axis_name="stage", perm=perm,
            fwd_bits=fwd_bits, bwd_bits=bwd_bits, exact=exact)
        send = send.at[r, m].set(jnp.where(sending, new_send.astype(send.dtype), old_send))
        recv = recv.at[rr, mr].set(jnp.where(receiving, new_recv.astype(recv.dtype), old_recv))
        return received, (send, recv)

    return handoff


def memory_shape(stages: int, repeats: int, microbatches: int, rows: int, seq_len: int,
                 hidden: int) -> tuple[int, ...]:
    """The global shape of each AC-SGD memory array: [S, V, M, b, T, D] (b = rows per micro-batch)."""
    return (stages, repeats, microbatches, rows, seq_len, hidden)


def handoff_bytes(iterations: int, rows: int, seq_len: int, hidden: int, fwd_bits: int | None,
                  bwd_bits: int | None, dtype: Any = jnp.float32) -> dict[str, int]:
    """Bytes one device sends to the next stage per step: `iterations` messages of [rows, T, D]
    forward (packed codes + scales, or the activations) and as many gradients backward."""
    shape = (rows, seq_len, hidden)
    return {"forward": iterations * acsgd_codec.message_bytes(shape, fwd_bits, dtype),
            "backward": iterations * acsgd_codec.message_bytes(shape, bwd_bits, dtype)}

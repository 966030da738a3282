"""AC-SGD: compressed activations between pipeline stages (DESIGN.md §7; Wang et al., NeurIPS 2022).

Pipeline stages hand activations [mb, T, D] to the next stage with a `ppermute` inside `jax.shard_map`.
AC-SGD sends, per training example, the *change* of the activation since that example's last pass:

* both the sender and the receiver keep m, the last reconstructed activation of the example at this
  boundary (host memory, `ActivationStore`, keyed by a stable example id);
* the sender sends Q_b(a - m) (b = 4 bits by default); both sides set m <- m + Q_b^-1(msg) and the
  receiver computes with m. The two copies of m stay bit-identical (see `dequantize`), so the error
  of the reconstruction is the quantization error of the last delta, which shrinks as training
  settles (consecutive activations of one example differ little);
* an example's first pass goes exactly (`exact=True`), filling m = a;
* the backward activation-gradient is quantized directly (no delta, no state) at 8 bits.

The quantizer follows the reference (`compress/fixpoint.py`): symmetric b-bit, one scale per hidden
channel (amax over every axis but the last), deterministic rounding, clip to [-2^(b-1), 2^(b-1)-1],
shifted to unsigned and bit-packed into uint8 for b in {2, 4, 8}. Two deliberate differences:

* the scale is amax * 2^(b-1) / (2^(b-1) - 1/2) instead of amax: with scale = amax the value +amax
  rounds to 2^(b-1) and is clipped a whole step away; widened, every value in [-amax, amax] is
  within half a step: |x - deq(q(x))| <= scale / 2^(b-1) / 2;
* scales travel as float32 (4 bytes per channel per message; 0.4% of a 4-bit message at T*mb = 1024),
  not float16: deltas shrink as training settles and fp16 scales would underflow (below 6e-5 they
  lose precision, below 6e-8 they flush to zero and the delta is silently dropped). The scale is
  rounded up to 16 significant bits so that code * step is exact in float32: the dequantized value
  is then the same with or without fused multiply-add, and the sender's and receiver's m agree
  bitwise whatever XLA fuses on either side.

Bytes on the wire per hand-off: `message_bytes(shape, bits)`; `training.hlo_bytes` checks the compiled
program sends exactly that.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from training.config import ConfigError

BITS = (2, 4, 8)
SCALE_DTYPE = jnp.float32  # scales travel as float32: see the module docstring
_SCALE_DROP_BITS = 8  # float32 mantissa bits cleared from a scale: 15 + 1 remain, code * step is exact
BUFFER_LIMIT_KEY = "pipeline.acsgd_buffer_mb"

Perm = Sequence[tuple[int, int]]


def _check_bits(bits: int, what: str = "bits") -> None:
    if bits not in BITS:
        raise ConfigError(f"{what}={bits!r}: AC-SGD quantizes to one of {BITS} bits (bit-packed into uint8)")


def _check_last_dim(dim: int, bits: int) -> None:
    per_byte = 8 // bits
    if dim % per_byte:
        raise ConfigError(f"cannot pack {bits}-bit codes: the last (hidden) dimension {dim} must be "
                          f"divisible by {per_byte} ({per_byte} codes per uint8 byte)")


def _round_scale_up(scale: jax.Array) -> jax.Array:
    """Round a non-negative float32 scale up to 16 significant bits (15 stored), so that
    code * scale / 2^(b-1) is exact in float32 for every |code| <= 2^(b-1) <= 128."""
    mask = jnp.uint32((1 << _SCALE_DROP_BITS) - 1)
    raw = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type((raw + mask) & ~mask, jnp.float32)


def _pack(unsigned: jax.Array, bits: int) -> jax.Array:
    """uint8 codes [..., D] (each < 2^bits) -> packed uint8 [..., D * bits / 8]; code j of a byte sits
    in bits [j * bits, (j + 1) * bits)."""
    per_byte = 8 // bits
    if per_byte == 1:
        return unsigned
    grouped = unsigned.reshape(*unsigned.shape[:-1], unsigned.shape[-1] // per_byte, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    return jnp.sum(grouped << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bits: sum == or


def _unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of `_pack`: uint8 [..., D * bits / 8] -> uint8 codes [..., D]."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    codes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)  # [..., D / per_byte, per_byte]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def quantize(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric `bits`-bit quantization of x [..., D] with one scale per hidden channel.

    Returns (codes uint8 [..., D * bits / 8] bit-packed, scale float32 [D]). The scale is
    amax * 2^(b-1) / (2^(b-1) - 1/2) rounded up (module docstring), amax over every axis but the last;
    a channel that is all zero gets scale 0 (and decodes to 0). Rounding is deterministic (half to
    even), so the sender and a re-run produce the same codes.
    """
    _check_bits(bits)
    if x.ndim == 0:
        raise ConfigError("quantize needs an array with a hidden (last) axis, got a scalar")
    _check_last_dim(x.shape[-1], bits)
    levels = 2 ** (bits - 1)
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=tuple(range(x.ndim - 1)))  # [D]
    scale = _round_scale_up(amax * (levels / (levels - 0.5)))  # [D] float32
    step = scale / levels  # exact: a power-of-two division
    safe = jnp.where(step > 0, step, 1.0)
    signed = jnp.clip(jnp.round(x32 / safe), -levels, levels - 1)  # [..., D]
    unsigned = (signed + levels).astype(jnp.uint8)  # [0, 2^b - 1]
    return _pack(unsigned, bits), scale.astype(SCALE_DTYPE)


def dequantize(codes: jax.Array, scale: jax.Array, bits: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Packed uint8 codes [..., D * bits / 8] and scale [D] -> values [..., D] in `dtype`.

    code * (scale / 2^(b-1)) is exact in float32 (the scale has 16 significant bits, |code| <= 128),
    so the result does not depend on how XLA fuses it: the two ends of a hand-off agree bitwise.
    """
    _check_bits(bits)
    levels = 2 ** (bits - 1)
    signed = _unpack(codes, bits).astype(jnp.int32) - levels  # [..., D]
    step = scale.astype(jnp.float32) / levels  # [D]
    return (signed.astype(jnp.float32) * step).astype(dtype)


def message_bytes(shape: Sequence[int], bits: int | None, dtype: jnp.dtype = jnp.float32) -> int:
    """Bytes one device sends for an array of `shape` [..., D]: packed codes + float32 scales, or
    the plain array when bits is None (`dtype` is then the array's dtype)."""
    if bits is None:
        return math.prod(shape) * jnp.dtype(dtype).itemsize
    _check_bits(bits)
    _check_last_dim(shape[-1], bits)
    return math.prod(shape) * bits // 8 + shape[-1] * jnp.dtype(SCALE_DTYPE).itemsize


def _inverse(perm: Perm) -> tuple[tuple[int, int], ...]:
    return tuple((dst, src) for src, dst in perm)


def _send(x: jax.Array, axis_name: Hashable, perm: Perm, bits: int | None) -> jax.Array:
    """ppermute x [..., D], quantized directly at `bits` (None: exactly); returns x's dtype."""
    if bits is None:
        return jax.lax.ppermute(x, axis_name, perm)
    codes, scale = quantize(x, bits)
    codes, scale = jax.lax.ppermute((codes, scale), axis_name, perm)
    return dequantize(codes, scale, bits, x.dtype)


def _forward(x: jax.Array, m_send: jax.Array, m_recv: jax.Array, axis_name: Hashable, perm: Perm,
             fwd_bits: int, exact: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The hand-off's forward pass (see `handoff`); every output in x's dtype."""
    if exact:
        received = jax.lax.ppermute(x, axis_name, perm)
        return received, x, received
    f32 = jnp.float32
    codes, scale = quantize(x.astype(f32) - m_send.astype(f32), fwd_bits)  # [mb, T, D*b/8], [D]
    r_codes, r_scale = jax.lax.ppermute((codes, scale), axis_name, perm)
    received = (m_recv.astype(f32) + dequantize(r_codes, r_scale, fwd_bits, f32)).astype(x.dtype)
    m_send_new = (m_send.astype(f32) + dequantize(codes, scale, fwd_bits, f32)).astype(x.dtype)
    return received, m_send_new, received


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _handoff(x, m_send, m_recv, axis_name, perm, fwd_bits, bwd_bits, exact):
    return _forward(x, m_send, m_recv, axis_name, perm, fwd_bits, exact)


def _handoff_fwd(x, m_send, m_recv, axis_name, perm, fwd_bits, bwd_bits, exact):
    return _forward(x, m_send, m_recv, axis_name, perm, fwd_bits, exact), None


def _handoff_bwd(axis_name, perm, fwd_bits, bwd_bits, exact, _residuals, cotangents):
    """Straight-through: each output counts as x itself. The receiver's cotangents (of `received`
    and `m_recv_new`) go back through the inverse permutation, quantized at `bwd_bits`; the sender's
    own `m_send_new` cotangent (normally zero) is added locally. m_send and m_recv get none."""
    ct_received, ct_m_send_new, ct_m_recv_new = cotangents
    ct_x = _send(ct_received + ct_m_recv_new, axis_name, _inverse(perm), bwd_bits)
    return ct_x + ct_m_send_new, None, None


_handoff.defvjp(_handoff_fwd, _handoff_bwd)


def handoff(x: jax.Array, m_send: jax.Array, m_recv: jax.Array, *, axis_name: Hashable, perm: Perm,
            fwd_bits: int = 4, bwd_bits: int | None = 8,
            exact: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AC-SGD's replacement for `jax.lax.ppermute(x, axis_name, perm)`; call it inside `shard_map`.

    x [mb, T, D] is what this device sends; m_send [mb, T, D] its copy of the reconstruction of the
    examples it sends, m_recv [mb, T, D] its copy of the reconstruction of the examples it receives
    (both from `ActivationStore.gather`; any float dtype). Returns, in x's dtype:

    * received [mb, T, D]: m_recv + deq(msg), the activation to compute with;
    * m_send_new = m_send + deq(own codes), to store on the sender side;
    * m_recv_new = received, to store on the receiver side; bitwise equal to the sender's m_send_new.

    Only the packed `fwd_bits` codes [mb, T, D*fwd_bits/8] uint8 and the float32 scales [D] cross
    (`message_bytes`). `exact=True` (static: a separate compiled program, used while any example of
    the micro-batch is on its first pass) sends x itself and returns m_send_new = x, m_recv_new =
    received. The backward pass sends the cotangent of `received` quantized directly at `bwd_bits`
    (None: exact) through the inverse permutation and returns it as x's cotangent (straight-through);
    `exact` does not change the backward. A device that no pair sends to receives a zero message
    (received = m_recv), like `ppermute`'s zeros.
    """
    _check_bits(fwd_bits, "fwd_bits")
    if bwd_bits is not None:
        _check_bits(bwd_bits, "bwd_bits")
    if x.ndim == 0 or m_send.shape != x.shape or m_recv.shape != x.shape:
        raise ConfigError(f"handoff needs x, m_send, m_recv of one shape [..., D], got {x.shape}, "
                          f"{m_send.shape}, {m_recv.shape}")
    if not exact:
        _check_last_dim(x.shape[-1], fwd_bits)
    if bwd_bits is not None:
        _check_last_dim(x.shape[-1], bwd_bits)
    perm = tuple((int(src), int(dst)) for src, dst in perm)
    return _handoff(x, m_send, m_recv, axis_name, perm, fwd_bits, bwd_bits, bool(exact))


class ActivationStore:
    """Host-memory (numpy) per-example buffers: one value [*value_shape] per stable example id.

    AC-SGD keeps, per example and per stage boundary, the last reconstructed activation on both the
    sender and the receiver (two stores, or one per side). Rows are allocated as new ids arrive
    (capacity doubling, never past the limit); `max_buffer_bytes` caps the stored values
    (ids x prod(value_shape) x itemsize); in `training.train` it comes from `pipeline.acsgd_buffer_mb`.
    """

    def __init__(self, value_shape: Sequence[int], *, max_buffer_bytes: int, dtype: np.dtype = np.float16):
        self.value_shape = tuple(int(d) for d in value_shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise ConfigError(f"ActivationStore dtype must be float16 or float32, got {self.dtype}")
        if any(d < 0 for d in self.value_shape):
            raise ConfigError(f"ActivationStore value_shape must be non-negative, got {self.value_shape}")
        if not isinstance(max_buffer_bytes, (int, np.integer)) or max_buffer_bytes <= 0:
            raise ConfigError(f"max_buffer_bytes ({BUFFER_LIMIT_KEY}) must be a positive number of bytes, "
                              f"got {max_buffer_bytes!r}")
        self.max_buffer_bytes = int(max_buffer_bytes)
        self.row_bytes = math.prod(self.value_shape) * self.dtype.itemsize
        self._rows: dict[int, int] = {}  # example id -> row of self._data
        self._data = np.zeros((0, *self.value_shape), self.dtype)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, example_id: int) -> bool:
        return int(example_id) in self._rows

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values (the quantity `max_buffer_bytes` limits)."""
        return len(self._rows) * self.row_bytes

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ConfigError(f"example ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}")
        return ids.astype(np.int64)

    def _check_limit(self, count: int) -> None:
        """Raise, naming the limit and the fix, when `count` rows would not fit."""
        needed = count * self.row_bytes
        if needed > self.max_buffer_bytes:
            raise ConfigError(
                f"AC-SGD activation buffer full: {count} examples x {self.row_bytes} bytes "
                f"({self.value_shape} {self.dtype.name}) need {needed} bytes, over this buffer's limit of "
                f"{self.max_buffer_bytes} bytes (set by {BUFFER_LIMIT_KEY}); raise {BUFFER_LIMIT_KEY} so "
                f"that it covers every distinct example of the training set, or use fewer examples")

    def _reserve(self, count: int) -> None:
        """Make room for `count` rows in all (capacity doubling, capped at the limit)."""
        self._check_limit(count)
        if count <= len(self._data):
            return
        max_rows = self.max_buffer_bytes // self.row_bytes if self.row_bytes else count
        rows = min(max(count, 2 * len(self._data), 16), max(max_rows, count))
        grown = np.zeros((rows, *self.value_shape), self.dtype)
        grown[:len(self._rows)] = self._data[:len(self._rows)]
        self._data = grown

    def gather(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """ids [n] -> (values [n, *value_shape] in the store's dtype, seen [n] bool); unseen rows are 0."""
        ids = self._ids(ids)
        rows = np.array([self._rows.get(i, -1) for i in ids.tolist()], dtype=np.int64)
        seen = rows >= 0
        values = np.zeros((len(ids), *self.value_shape), self.dtype)
        values[seen] = self._data[rows[seen]]
        return values, seen

    def scatter(self, ids, values) -> None:
        """Store values [n, *value_shape] (cast to the store's dtype) under ids [n]. An id repeated
        within one call keeps its last value. Raises `ConfigError`, storing nothing, past the limit."""
        ids = self._ids(ids)
        values = np.asarray(values)
        if values.shape != (len(ids), *self.value_shape):
            raise ConfigError(f"scatter: values of shape {values.shape} do not match {len(ids)} ids "
                              f"x value_shape {self.value_shape}")
        _, last_reversed = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last_reversed)  # the last occurrence of each id
        ids, values = ids[keep], values[keep]
        new = [i for i in ids.tolist() if i not in self._rows]
        self._reserve(len(self._rows) + len(new))
        for i in new:
            self._rows[i] = len(self._rows)
        rows = np.array([self._rows[i] for i in ids.tolist()], dtype=np.int64)
        self._data[rows] = values.astype(self.dtype)

    def save(self, path: str | Path) -> None:
        """Write ids and values to an .npz file atomically (temporary file in the same folder, fsync,
        rename), so a crash leaves the previous file intact."""
        path = Path(path)
        count = len(self._rows)
        ids = np.empty(count, np.int64)
        ids[list(self._rows.values())] = list(self._rows.keys())  # in row order
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, values=self._data[:count],
                         value_shape=np.array(self.value_shape, np.int64), dtype=np.array(self.dtype.name))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, path: str | Path) -> None:
        """Replace the contents with a file written by `save` (same value_shape and dtype, within the
        limit); raises `ConfigError` naming the mismatch."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"AC-SGD activation buffer file {path} does not exist")
        with np.load(path, allow_pickle=False) as f:
            shape, dtype = tuple(int(d) for d in f["value_shape"]), str(f["dtype"])
            if shape != self.value_shape or dtype != self.dtype.name:
                raise ConfigError(f"{path} holds {shape} {dtype} activations, this store {self.value_shape} "
                                  f"{self.dtype.name}")
            ids, values = f["ids"], f["values"]
        if len(set(ids.tolist())) != len(ids) or values.shape != (len(ids), *self.value_shape):
            raise ConfigError(f"{path} is not a valid activation buffer (ids and values disagree)")
        self._check_limit(len(ids))  # before anything changes
        self._rows, self._data = {}, np.zeros((0, *self.value_shape), self.dtype)
        self._reserve(len(ids))
        self._rows = {int(i): r for r, i in enumerate(ids.tolist())}
        self._data[:len(ids)] = values

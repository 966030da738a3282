"""Mosaic GPU's interpret mode (JAX 0.10), with wgmma's transposed shared-memory operands.

The interpreter runs a Mosaic GPU kernel on CPU, simulating shared memory, TMA copies and
barriers. Its wgmma reads each operand's buffer through index transforms only, so an operand
given as `plgpu.transpose_ref(ref, (1, 0))` (how a kernel asks the hardware for k^T) fails. This
module replaces the interpreter's wgmma callback with one that reads the buffer the same way and
then applies the transpose, exactly what the hardware's transposed-operand mode computes; nothing
else changes. It touches JAX internals, so it checks that they are the ones it knows and raises
KernelError otherwise.
"""

from __future__ import annotations

import functools

import numpy as np

from pallas_kernels import KernelError


def _internals():
    """The interpreter modules this relies on; KernelError if this JAX lacks them."""
    try:
        from jax._src.pallas.mosaic.interpret import utils
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        from jax._src.state.types import TransposeTransform
    except ImportError as error:
        raise KernelError(f"Mosaic GPU interpret mode is not available in this JAX ({error}); "
                          "check the Hopper kernel on JAX 0.10.x, or use kernel='gpu'") from error
    for name in ("wgmma", "_get_shared_memory", "_remove_noop_transforms", "HostAllocationKey"):
        if not hasattr(gpu_callbacks, name):
            raise KernelError(f"this JAX's Mosaic GPU interpreter has no '{name}'; the Hopper kernel's "
                              "interpret mode was written for JAX 0.10.x")
    return utils, gpu_callbacks, InterpretGPUParams, TransposeTransform


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
           acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
           source_info=None):
    """acc += a @ b on the simulated shared memory, where a or b may end in a transpose."""
    utils, callbacks, _, transpose_type = _internals()
    memory = callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(int(device_id), int(thread_id))
    log = utils.GPULoggingInfo(device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
                               thread_id=int(thread_id), source_info=source_info)

    def locate(key, transforms):
        transforms = [t if isinstance(t, transpose_type) else _as_ints(t)
                      for t in callbacks._remove_noop_transforms(transforms)]
        permutation = None
        if transforms and isinstance(transforms[-1], transpose_type):
            permutation, transforms = transforms[-1].permutation, transforms[:-1]
        return callbacks.HostAllocationKey.from_array(key), utils.to_range(transforms), permutation

    def read(key, transforms):
        key, where, permutation = locate(key, transforms)
        value, _, _ = memory.get_buffer_content(key, where, thread, logging_info=log)
        return value if permutation is None else np.transpose(value, permutation)

    a, b = read(a_allocation_key_as_array, a_transforms), read(b_allocation_key_as_array, b_transforms)
    acc_key, acc_where, _ = locate(acc_allocation_key_as_array, acc_transforms)
    acc, _, _ = memory.get_buffer_content(acc_key, acc_where, thread, logging_info=log)
    memory.store_buffer_content(acc_key, acc_where, acc + np.matmul(a, b, dtype=acc_dtype), thread, logging_info=log)
    return token


def _as_ints(transform):
    import jax
    return jax.tree.map(int, transform)


@functools.cache
def interpret_params():
    """Mosaic GPU interpret params, with the wgmma callback that knows transposes installed."""
    _, callbacks, params_type, _ = _internals()
    callbacks.wgmma = _wgmma
    return params_type()

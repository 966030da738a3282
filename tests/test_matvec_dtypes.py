"""The weight-format matmul benchmark (`benchmarks/matvec_dtypes.py`): its HLO reading tells a
conversion paid every step from one hoisted out of the loop, and it runs every format on a tiny model."""

import jax
import jax.numpy as jnp

from benchmarks.matvec_dtypes import converts_in_loop, layer_matmuls, run, step_program
from jaxmodels import cpu_matvec, init_params
from jaxmodels.testing import tiny_config


def _loop(convert_each_step: bool):
    """int8 weights times x in a loop: offset by a value computed in the loop (which XLA cannot
    prove zero, so it converts in the body) or not (XLA hoists the loop-invariant conversion)."""
    def program(layers, x):
        def body(i, x):
            for layer in layers:
                for w in layer.values():
                    wi = w + (x[0, 0] > 1e9).astype(jnp.int8) if convert_each_step else w
                    wf = wi.astype(jnp.float32)
                    x = jnp.tanh(x @ wf)
            return x
        return jax.lax.fori_loop(0, 3, body, x)
    return jax.jit(program)


def test_the_hlo_reading_tells_per_step_from_hoisted_conversions():
    layers = [{"w": jnp.ones((64, 64), jnp.int8)}, {"w": jnp.ones((64, 64), jnp.int8)}]
    x = jnp.ones((2, 64), jnp.float32)
    assert converts_in_loop(_loop(True), layers, x) == (True, False)
    assert converts_in_loop(_loop(False), layers, x) == (False, True)
    f32_layers = [{"w": jnp.ones((64, 64), jnp.float32)}]
    assert converts_in_loop(_loop(False), f32_layers, x) == (False, False)


def test_every_format_runs_on_a_tiny_model_through_xla_and_the_kernel():
    """Each format through XLA's dot and through the CPU kernel; the kernel loop reads int8 and
    bf16 as stored (no float32 copy hoisted out of it), XLA's does not."""
    config = tiny_config(num_hidden_layers=2)
    params = init_params(config, jax.random.key(0))
    assert len(layer_matmuls(params, "int8")) == 2
    body, result = run(params, ["float32", "bfloat16", "int8"], [1, 3], steps=2, repeats=1)
    paths = ("xla", "kernel") if cpu_matvec.available() else ("xla",)
    assert set(result) == {(f, p, r) for f in ("float32", "bfloat16", "int8") for p in paths for r in (1, 3)}
    assert all(step > 0 and fixed >= 0 for step, fixed in result.values())
    float32_rows = [line for line in body.splitlines() if line.startswith("| float32 |")]
    assert len(float32_rows) == 2 * len(paths) and all(line.endswith("| no | no |") for line in float32_rows)
    assert any(line.startswith("| int8 | XLA dot |") and "| yes (the loop reads float32) |" in line
               for line in body.splitlines())
    if cpu_matvec.available():
        kernel_rows = [line for line in body.splitlines() if "| CPU kernel |" in line]
        assert len(kernel_rows) == 6 and all(line.endswith("| no | no |") for line in kernel_rows)
    assert callable(step_program(1))

"""The Pallas attention kernel wired into decoding (`KVCache.attention_impl`, `generate(...,
attention_impl=, interpret=)`): in interpret mode on CPU it gives the jnp path's greedy tokens in
plain decoding, self-speculation and under a CHAI plan; the options are validated."""

import jax
import jax.numpy as jnp
import pytest

from inference import InferenceError, generate
from inference.speculative import SpecConfig
from jaxmodels import init_params
from jaxmodels.attention_plan import cluster_plan
from jaxmodels.testing import tiny_config

CONFIG = tiny_config(num_attention_heads=4, num_key_value_heads=2)
PARAMS = init_params(CONFIG, jax.random.key(3), std=0.3)
PROMPTS = [[5, 9, 200, 31, 7], [17, 4], [8, 8, 8, 8, 8, 8, 8, 8, 8]]


def _tokens(**kwargs):
    return generate(PARAMS, CONFIG, PROMPTS, 12, eos_token_ids=(), **kwargs).tokens


@pytest.mark.parametrize("spec", [None, SpecConfig(2, 3, adaptive=False)])
def test_the_interpreted_kernel_gives_the_jnp_paths_tokens(spec):
    assert _tokens(speculative=spec, attention_impl="pallas", interpret=True) == _tokens(speculative=spec)


def test_the_interpreted_kernel_follows_a_chai_plan():
    labels = jnp.asarray([[0, 0], [0, 1], [1, 1]])  # KV head clusters per prompt
    plans = [cluster_plan(labels, 2, CONFIG.num_attention_heads)] * CONFIG.num_hidden_layers
    want = _tokens(attention_plan=plans)
    assert _tokens(attention_plan=plans, attention_impl="pallas", interpret=True) == want
    assert want != _tokens()  # the plan changes the model, so the comparison above can fail


def test_the_options_are_checked_with_the_fix():
    with pytest.raises(InferenceError, match="interpret=True"):
        _tokens(attention_impl="pallas")
    with pytest.raises(InferenceError, match="use it with attention_impl='pallas'"):
        _tokens(interpret=True)
    with pytest.raises(InferenceError, match="attention_impl must be one of"):
        _tokens(attention_impl="triton")
    assert _tokens(attention_impl="reference") == _tokens()  # "auto" is the jnp path on CPU


def test_smollm2_decodes_the_same_tokens_through_the_interpreted_kernel(smollm2_loaded_once):
    """The issue's end-to-end check on a real model: plain and self-speculative greedy decoding
    (every round verifies d + 1 tokens through the kernel) equal the jnp path's tokens."""
    from jaxmodels.convert import load as load_module
    from jaxmodels.params import decode_layout

    config, params, tokenizer = load_module.load_model("smollm2")
    params = decode_layout(params)
    prompts = [tokenizer.encode("def fibonacci(n):"), tokenizer.encode("The capital of France is")]
    for spec in (None, SpecConfig(4, 3, adaptive=False)):
        run = lambda **kw: generate(params, config, prompts, 8, eos_token_ids=(), speculative=spec, **kw)  # noqa: E731
        assert run(attention_impl="pallas", interpret=True).tokens == run(attention_impl="reference").tokens


def test_auto_takes_the_jnp_path_with_a_warning_where_the_kernel_fails_its_check(monkeypatch):
    """On TPU and GPU, "auto" runs the kernel only once `kernel_problem` has checked it there.
    Posing as a GPU on this CPU, the kernel cannot compile (Pallas runs only interpreted here):
    decoding warns, names the fix, and gives the jnp path's tokens."""
    from inference import engine

    want = _tokens()
    monkeypatch.setattr(engine, "_COMPILED", {})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(RuntimeWarning, match="did not pass its check on this gpu .*attention_impl='reference'"):
        got = _tokens()
    assert got == want


def test_the_kernel_check_passes_a_working_kernel_and_names_what_fails(monkeypatch):
    from pallas_kernels.attention import self_check
    from pallas_kernels.attention.reference import attention_reference

    shapes = (2, 3, 4, 2, 2, 32, 16, "float32")  # batch, S_q, heads, K slots, KV heads, cache, hd
    assert self_check.kernel_problem(*shapes, interpret=True) is None  # the TPU kernel, interpreted
    assert "interpret mode" in self_check.kernel_problem(*shapes)  # Pallas's refusal to compile on a CPU
    monkeypatch.setattr(self_check, "attention_reference", lambda *a: 2 * attention_reference(*a))
    assert "differs from the reference" in self_check.kernel_problem(2, 1, 4, 2, 2, 32, 16, "float32", interpret=True)

"""`inference.generate` as a service calls it: the model loaded once, one compiled program per shape
bucket, reused by every later call in that bucket. Counted from jax.monitoring: every program JAX
lowers for XLA (a lowering happens on every in-process cache miss, whether XLA then compiles or
loads the result from the persistent compilation cache the tests use)."""

import jax
import pytest

from inference import generate
from jaxmodels.config import LlamaConfig
from jaxmodels.model import init_params, unstack_layers

COMPILE_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return config, unstack_layers(init_params(config, jax.random.key(0)))  # unstacked once, as a service would


@pytest.fixture
def compilations():
    """A list that gets one entry per program lowered for XLA while the test runs."""
    seen: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    from jax._src import monitoring  # no public way to remove a listener
    monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_calls_in_one_bucket_compile_nothing_new(model, compilations, sampled):
    config, params = model
    settings = lambda t: {"temperature": t, "top_p": 0.9, "seed": 3} if sampled else {}  # noqa: E731
    first = generate(params, config, [[1, 2, 3], [4, 5]], max_new_tokens=20, **settings(0.7))
    assert compilations and first.compile_seconds > 0  # the bucket's programs, compiled on first use
    before = len(compilations)
    # other prompts, lengths, budgets, temperatures and seeds in the same bucket (prompt <= 16, <= 32 new)
    for prompts, new, t in [([[7] * 9, [3] * 14], 30, 0.9), ([[5] * 16, [1]], 17, 1.3)]:
        result = generate(params, config, prompts, max_new_tokens=new, **settings(t))
        assert result.compile_seconds == 0 and len(result.tokens) == 2
    assert len(compilations) == before  # not one new program
    generate(params, config, [[1] * 40, [2]], max_new_tokens=100, **settings(0.7))  # another bucket
    assert len(compilations) > before  # (the counter does see new programs)

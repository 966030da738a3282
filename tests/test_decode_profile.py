"""The decode-step profiler (`benchmarks/decode_profile.py`): wall time split among concurrent ops
adds up to the time any op ran, and every op of a tiny model's decode loop lands in its class."""

import jax
import numpy as np
from hypothesis import given, settings, strategies as st

from benchmarks.decode_profile import BETWEEN_OPS, profile_decode, wall_time_by_class
from jaxmodels import cpu_matvec, init_params
from jaxmodels.params import decode_layout
from jaxmodels.quantize import WEIGHT_FORMATS, convert_weights
from jaxmodels.testing import tiny_config


def _union_length(intervals):
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 30), st.sampled_from("abc")), min_size=1, max_size=12))
def test_split_wall_time_adds_up_to_the_busy_time(spans):
    events = [(start, start + length, cls) for start, length, cls in spans]
    wall = wall_time_by_class(events)
    assert np.isclose(sum(wall.values()), _union_length([(a, b) for a, b, _ in events]))
    for cls, t in wall.items():  # a class never gets more than its ops' summed durations
        assert t <= sum(b - a for a, b, c in events if c == cls) + 1e-9


def test_a_tiny_models_decode_loop_is_classified_in_every_weight_format():
    config = tiny_config(tie_word_embeddings=True)
    params = init_params(config, jax.random.key(0))
    for weights in WEIGHT_FORMATS:
        res = profile_decode(decode_layout(convert_weights(params, weights)), config, [[1, 2, 3], [4, 5]], 6)
        classes = res["classes"]
        per_step = {name: count for name, (_, count) in classes.items()}
        # the CPU kernel takes q/k/v in one call and gate/up in one (`layers.dense_many`), then o and down
        calls = 4 if cpu_matvec.available() else 7
        assert per_step["weight matmuls"] == calls * config.num_hidden_layers, weights
        assert per_step["LM head matmul"] == 1 and "attention" in per_step, weights
        assert per_step.get("embedding lookup") == (1 if weights == "bfloat16" else None), weights  # take_rows
        busy = sum(ms for name, (ms, _) in classes.items() if name != BETWEEN_OPS)
        assert busy <= res["traced_ms"] * 1.001 and np.isclose(busy + classes[BETWEEN_OPS][0], res["traced_ms"])
        # 2 x L x KV x hd x 4 B per position; the kernel reads rows' lengths (prompt + step, 5 steps)
        # and the jnp path the whole 128-position buffers
        positions = (3 + 3) + (2 + 3) if cpu_matvec.available() else 2 * 128
        assert res["must_read"]["attention"] == 2 * 4 * 2 * 16 * 4 * positions

"""The weight table and what is derived from it: counts, logical axes, FSDP shardings, byte/FLOP models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxmodels import LayerVariants, LowRank, init_params
from jaxmodels.params import param_shapes, with_variants
from jaxmodels.testing import tiny_config
from jaxmodels.weights import LAYER_KEYS, logical_axes, matmul_param_count

CONFIG = tiny_config()  # 4 layers, D 64, H 4 x hd 16, KV 2, F 128, V 256, untied
VARIANTS = LayerVariants.hybrid(4, {"wq": 8, "w_up": 16}, full_rank_layers=1)


def test_counts_match_the_closed_form():
    d, f, v, q, kv, L = 64, 128, 256, 64, 32, 4
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f
    assert CONFIG.num_params() == v * d + L * (per_layer + 2 * d) + d + d * v
    assert tiny_config(tie_word_embeddings=True).num_params() == v * d + L * (per_layer + 2 * d) + d
    assert matmul_param_count(CONFIG) == L * per_layer + d * v
    low = CONFIG.replace(layer_variants=VARIANTS)
    saved = 3 * ((d * q - (d + q) * 8) + (d * f - (d + f) * 16))
    assert low.num_params() == CONFIG.num_params() - saved
    assert matmul_param_count(low) == matmul_param_count(CONFIG) - saved


def test_param_shapes_follow_the_table_and_the_segments():
    shapes = param_shapes(CONFIG)
    assert tuple(shapes["layers"]) == LAYER_KEYS and shapes["layers"]["wk"] == (4, 64, 32)
    seg = param_shapes(CONFIG.replace(layer_variants=VARIANTS))["layers"]
    assert seg[0]["wq"] == (1, 64, 64) and seg[1]["wq"] == LowRank(u=(3, 64, 8), v=(3, 8, 64))
    assert param_shapes(CONFIG, stacked=False)["layers"][2]["w_down"] == (128, 64)


def test_logical_axes_name_stacked_factor_and_optimizer_leaves():
    params = init_params(CONFIG.replace(layer_variants=VARIANTS), jax.random.key(0))
    state = optax.adamw(1e-3).init(params)
    axes = {jax.tree_util.keystr(p): logical_axes(p, x.ndim)
            for p, x in jax.tree_util.tree_leaves_with_path({"params": params, "opt": state})}
    assert axes["['params']['layers'][1]['wq'].u"] == ("layers", "embed", "rank")
    assert axes["['params']['layers'][1]['w_up'].v"] == ("layers", "rank", "mlp")
    assert axes["['params']['layers'][0]['attn_norm']"] == ("layers", "embed")
    assert axes["['params']['lm_head']"] == ("embed", "vocab")
    moments = [a for k, a in axes.items() if k.startswith("['opt']") and "mu" in k and "['w_down']" in k]
    assert moments == [("layers", "mlp", "embed")] * 2  # one per segment
    assert axes["['opt'][0].count"] is None


def test_fsdp_shardings_come_from_logical_axes():
    from training import parallel
    from training.config import MeshSection

    mesh = parallel.make_mesh(MeshSection(data=2, fsdp=4))
    params = init_params(CONFIG.replace(layer_variants=VARIANTS), jax.random.key(0))
    specs = jax.tree_util.tree_map(lambda s: s.spec, parallel.state_shardings(params, mesh))
    assert specs["layers"][1]["wq"].u == P(None, "fsdp", None)  # [3, D=64, r=8]: never the layer axis
    assert specs["layers"][1]["w_up"].v == P(None, None, "fsdp")  # [3, r=16, F=128]
    assert specs["layers"][0]["attn_norm"] == P(None, "fsdp")  # [1, D]
    assert specs["embed"] == P("fsdp", None)


def test_byte_and_flop_models_count_factorized_layers_at_their_rank():
    from benchmarks.train_step import flops_per_token
    from inference.calibrate import memory_bound_costs

    low = tiny_config(layer_variants=LayerVariants.hybrid(4, {k: 8 for k in ("wq", "wo", "w_gate", "w_up", "w_down")}))
    assert memory_bound_costs(low, 2).head[0] > memory_bound_costs(CONFIG, 2).head[0]  # lighter layers
    d, f, v, q, kv = 64, 128, 256, 64, 32
    assert memory_bound_costs(CONFIG, 2).head[0] == v * d / (d * (2 * q + 2 * kv) + 3 * d * f)
    attention = 6 * 4 * 32 * q
    assert flops_per_token(CONFIG, 32) == 6 * matmul_param_count(CONFIG) + attention
    assert flops_per_token(low, 32) < flops_per_token(CONFIG, 32)


def test_without_deep_layers_zeroes_residual_writes_of_factorized_layers():
    from benchmarks.layerskip import without_deep_layers

    config, params = with_variants(CONFIG, init_params(CONFIG, jax.random.key(0)),
                                   LayerVariants.hybrid(4, {"wo": 8, "w_down": 8}, full_rank_layers=2))
    cut = without_deep_layers(params, 1)["layers"]
    assert float(jnp.abs(cut[0]["wo"]).sum()) > 0
    assert float(jnp.abs(cut[1]["wo"]).sum()) == 0 and float(jnp.abs(cut[3]["w_down"].v).sum()) == 0
    np.testing.assert_array_equal(cut[3]["wq"], params["layers"][1]["wq"][1])

"""jaxmodels: Llama-family models in JAX/Flax NNX, built to be cheap to train and fast to serve.

Public API (the model and its pieces; conversions live in `jaxmodels.convert`):

    config = jaxmodels.LlamaConfig(...)             # HF LlamaConfig field names
    model = jaxmodels.Llama(config, rngs=nnx.Rngs(0))
    logits, _ = jaxmodels.forward(model.params(), config, tokens)
"""

from jaxmodels.attention_plan import AttentionPlan, cluster_plan, identity_plan
from jaxmodels.config import ConfigError, LlamaConfig
from jaxmodels.kv_cache import KVCache
from jaxmodels.layers import dense
from jaxmodels.model import (Llama, Params, decoder_layer, embed_tokens, exit_logits, forward, init_params,
                             param_shapes, run_layers)
from jaxmodels.weights import LayerVariants, LowRank

__all__ = ["AttentionPlan", "ConfigError", "LlamaConfig", "KVCache", "LayerVariants", "Llama", "LowRank", "Params",
           "decoder_layer", "dense", "embed_tokens", "exit_logits", "forward", "init_params", "param_shapes",
           "run_layers", "cluster_plan", "identity_plan"]

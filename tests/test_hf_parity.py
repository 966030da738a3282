"""Hugging Face interop: logits parity, export round trips, greedy generation parity."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from inference import generate
from jaxmodels.config import LlamaConfig
from jaxmodels.convert.hf import load_hf_checkpoint, save_hf_checkpoint
from jaxmodels.model import forward
from tests.hf_models import LLAMA3_SCALING, hf_logits, tiny_hf_llama

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["rope", "llama3-rope"])
def test_import_logits_match_transformers(tie, scaling):
    model, folder = tiny_hf_llama(tie=tie, rope_scaling=scaling)
    config, params = load_hf_checkpoint(folder)
    assert config.tie_word_embeddings == tie and config.num_key_value_heads == 2
    assert config.rope_theta == 50000.0  # read from transformers 5's rope_parameters
    ours, _ = jax.jit(forward, static_argnums=1)(params, config, TOKENS)
    np.testing.assert_allclose(np.asarray(ours), hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_legacy_config_keys_are_read():
    """transformers 4 wrote rope_theta / rope_scaling at the top level."""
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
           "vocab_size": 256, "rope_theta": 100000.0, "rope_scaling": LLAMA3_SCALING}
    config = LlamaConfig.from_hf_dict(raw)
    assert config.rope_theta == 100000.0 and config.rope_type == "llama3"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_round_trips_and_loads_in_transformers(tmp_path, tie):
    model, folder = tiny_hf_llama(tie=tie, rope_scaling=LLAMA3_SCALING)
    config, params = load_hf_checkpoint(folder)
    save_hf_checkpoint(tmp_path, config, params)
    config2, params2 = load_hf_checkpoint(tmp_path)
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)  # exact
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=1e-6)


def test_sharded_export_round_trips(tmp_path):
    _, folder = tiny_hf_llama()
    config, params = load_hf_checkpoint(folder)
    save_hf_checkpoint(tmp_path, config, params, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, params2 = load_hf_checkpoint(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
    transformers.LlamaForCausalLM.from_pretrained(tmp_path)  # transformers reads our shards


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_greedy_generation_matches_transformers(tie):
    model, folder = tiny_hf_llama(tie=tie, seed=1)
    config, params = load_hf_checkpoint(folder)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 130))]
    ours = generate(params, config, prompts, 24, eos_token_ids=())
    for prompt, row in zip(prompts, ours.tokens):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert row == ref[0, len(prompt):].tolist()

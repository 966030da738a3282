"""GGUF import: logits parity with transformers (tiny random model and real SmolLM2), errors, dispatch.

The tiny model is written to GGUF here the way llama.cpp's converter does it (F32, Q/K rows
permuted for ggml's RoPE layout, `llama.*` metadata), so the test checks the inverse permutation,
transposes, tied embeddings and rope_theta, not just that some file loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmodels.convert import CheckpointError, Tokenizer, load_gguf, load_model, save_hf_checkpoint
from jaxmodels.convert.gguf import _permute_rows, _unpermute_rows, smollm2_gguf_path
from jaxmodels.model import forward

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=128)
_LAYER_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def tiny_hf_model(rope_theta: float, tied: bool, seed: int = 0, rope_scaling: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    cfg = LlamaConfig(**TINY, rope_parameters=rope, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; randomize them so a swapped norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def write_gguf(path: Path, model, *, arch: str = "llama", skip: tuple[str, ...] = (),
               meta_overrides: dict | None = None, extra_tensors: dict | None = None) -> Path:
    """Write an HF Llama as an F32 GGUF, as llama.cpp's convert_hf_to_gguf.py lays it out."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    meta = dict(block_count=cfg.num_hidden_layers, context_length=cfg.max_position_embeddings,
                embedding_length=cfg.hidden_size, feed_forward_length=cfg.intermediate_size,
                head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                layer_norm_rms_eps=cfg.rms_norm_eps, rope_freq_base=cfg.rope_parameters["rope_theta"],
                rope_dimension_count=cfg.head_dim, vocab_size=cfg.vocab_size)
    meta.update(meta_overrides or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
               "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in _LAYER_GGUF.items():
            x = sd[f"model.layers.{i}.{hf_name}.weight"]
            if g_name == "attn_q":
                x = _permute_rows(x, cfg.num_attention_heads)
            elif g_name == "attn_k":
                x = _permute_rows(x, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{g_name}.weight"] = x
    tensors.update(extra_tensors or {})
    for name, x in tensors.items():
        if name not in skip:
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 12))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(1).standard_normal((4 * 16, 24)).astype(np.float32)
    permuted = _permute_rows(w, 4)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(_unpermute_rows(permuted, 4), w)
    # llama.cpp interleaves the two rotate-half halves of each head: row 1 comes from row hd/2 = 8
    np.testing.assert_array_equal(permuted[1], w[8])


@pytest.mark.parametrize("tied, theta", [(False, 100000.0), (True, 10000.0)])
def test_tiny_gguf_logits_match_transformers(tmp_path, tied, theta):
    model = tiny_hf_model(theta, tied)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    config, params = load_gguf(path)
    assert config.rope_theta == theta and config.tie_word_embeddings == tied
    assert ("lm_head" in params) != tied
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    expected = hf_logits(model, TOKENS)
    ours = np.asarray(forward(jax.tree.map(jnp.asarray, params), config, jnp.asarray(TOKENS))[0])
    diff = np.abs(ours - expected).max()
    print(f"tiny GGUF (tied={tied}, theta={theta}) max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    # rope_theta matters at these positions: the default 10000 would be visibly wrong
    if theta != 10000.0:
        wrong = np.asarray(forward(params, config.replace(rope_theta=10000.0), jnp.asarray(TOKENS))[0])
        assert np.abs(wrong - expected).max() > 1e-3


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama 3.1/3.2 GGUFs store RoPE scaling only as per-frequency divisors (rope_freqs.weight)."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    model = tiny_hf_model(500000.0, tied=True, rope_scaling=scaling)
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    divisors = (plain / model.model.rotary_emb.inv_freq.double().numpy()).astype(np.float32)
    assert divisors.max() > 7 and divisors.min() < 1.001  # some frequencies scaled, some not
    path = write_gguf(tmp_path / "l3.gguf", model, extra_tensors={"rope_freqs.weight": divisors})
    config, params = load_gguf(path)
    assert config.rope_scaling_dict == scaling and config.rope_theta == 500000.0
    long_tokens = np.random.default_rng(2).integers(0, 256, size=(1, 100))
    diff = np.abs(np.asarray(forward(params, config, jnp.asarray(long_tokens))[0])
                  - hf_logits(model, long_tokens)).max()
    assert diff < 1e-4
    odd = write_gguf(tmp_path / "odd.gguf", model, extra_tensors={"rope_freqs.weight": divisors * 1.5})
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        load_gguf(odd)


# ------------------------------------------------------------------ real SmolLM2-135M-Instruct
@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf_path()
    except CheckpointError as err:
        pytest.skip(str(err))
    config, params, tokenizer = load_model(path)
    return config, jax.tree.map(jnp.asarray, params), tokenizer, transformers_gguf_model(path)


@pytest.fixture(scope="module")
def smollm2_logits(smollm2):
    """Our SmolLM2 logits of one prompt, always computed on a [1, WIDTH] buffer (the prompt, then
    zeros): one compiled program for every SmolLM2 test here (compiling the 30 layers dominates
    them). Causal attention makes the trailing padding invisible to the prompt's positions.
    WIDTH holds every prompt and the chat prompt's 16 greedy tokens."""
    config, params, tokenizer, _ = smollm2
    width = max(len(_prompt_ids(tokenizer, p)) for p in PROMPTS) + 16
    run = jax.jit(lambda p, toks: forward(p, config, toks)[0][0])

    def logits(ids: list[int]) -> np.ndarray:
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        return np.asarray(run(params, jnp.asarray(buf)))[:len(ids)]
    return logits


def transformers_gguf_model(path: Path):
    """SmolLM2 through transformers' own GGUF reader (its dequantization and Q/K un-permutation).

    `from_pretrained(..., gguf_file=...)` runs exactly this, but refuses to start without the
    `accelerate` package, which this project does not depend on; so call its two steps directly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    ",
           [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]]


def _prompt_ids(tokenizer: Tokenizer, prompt) -> list[int]:
    text = tokenizer.apply_chat_template(prompt) if isinstance(prompt, list) else prompt
    return tokenizer.encode(text)


def test_smollm2_config_from_metadata(smollm2):
    config, _, tokenizer, ref = smollm2
    assert config.rope_theta == 100000.0 == ref.config.rope_parameters["rope_theta"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-5
    assert tokenizer is not None and tokenizer.eos_token_ids == (2,)


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, smollm2_logits):
    config, params, tokenizer, ref = smollm2
    for prompt in PROMPTS:
        ids = np.asarray([_prompt_ids(tokenizer, prompt)])
        expected = hf_logits(ref, ids)
        ours = smollm2_logits(ids[0].tolist())[None]
        assert ours.shape == expected.shape
        diff = np.abs(ours - expected).max()
        print(f"SmolLM2 {ids.shape[1]:3d} tokens: max |logit diff| = {diff:.2e} "
              f"(logit scale {np.abs(expected).max():.1f})")
        assert diff < 5e-4  # measured 0.8e-4 .. 1.6e-4 on logits of magnitude ~30
        np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


def test_smollm2_greedy_continuation_matches_transformers(smollm2, smollm2_logits):
    config, params, tokenizer, ref = smollm2
    new = 16
    prompt = _prompt_ids(tokenizer, PROMPTS[2])
    seq = list(prompt)
    for _ in range(new):  # the program of the logits test: one fixed-width buffer
        seq.append(int(np.argmax(smollm2_logits(seq)[-1])))
    ours = seq[len(prompt):]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    print("greedy:", repr(tokenizer.decode(ours)))
    assert ours == theirs


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def small_model():
    return tiny_hf_model(10000.0, tied=False, seed=3)


def test_gguf_file_errors(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(text)
    good = write_gguf(tmp_path / "good.gguf", small_model).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:200])
    with pytest.raises(CheckpointError, match="damaged|truncated"):
        load_gguf(tmp_path / "cut.gguf")


def test_gguf_content_errors(tmp_path, small_model):
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", small_model, arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        load_gguf(gpt2)
    missing = write_gguf(tmp_path / "missing.gguf", small_model, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_up\.weight' is missing"):
        load_gguf(missing)
    bad = write_gguf(tmp_path / "bad.gguf", small_model, meta_overrides={"feed_forward_length": 96})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate\.weight' has shape \(128, 64\).*\(96, 64\)"):
        load_gguf(bad)


def test_load_model_errors(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="does not exist.*gguf"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json.*accepted|no config.json.*pass"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")

    from jaxmodels.config import LlamaConfig
    cfg = LlamaConfig(**TINY, rope_theta=10000.0)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(noweights)
    (noweights / "config.json").write_text('{"vocab_size": 256, "hidden')
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(noweights)

    _, params = load_gguf(write_gguf(tmp_path / "m.gguf", small_model))
    folder = save_hf_checkpoint(tmp_path / "hf", cfg, params)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_model(folder)


def test_load_model_dispatch(tmp_path, small_model):
    """A .gguf file, an HF folder and a run folder (model/ inside) all load to the same weights."""
    path = write_gguf(tmp_path / "m.gguf", small_model)
    config, params, tokenizer = load_model(path)
    assert tokenizer is None  # the tiny file carries no tokenizer metadata
    run = tmp_path / "run"
    save_hf_checkpoint(run / "model", config, params)
    config2, params2, tok2 = load_model(run)
    assert config2.to_hf_dict() == config.to_hf_dict() and tok2 is None
    import tokenizers

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 5}, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    Tokenizer(words, eos_token_ids=[2]).save(run / "model")
    _, _, tok3 = load_model(run / "model")
    assert tok3 is not None and tok3.encode("hi hi") == [5, 5] and tok3.eos_token_ids == (2,)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_gguf_load_shows_a_progress_bar_only_when_asked(tmp_path, small_model, capsys):
    path = write_gguf(tmp_path / "m.gguf", small_model)
    load_model(path)
    assert capsys.readouterr().err == ""
    load_model(path, progress=True)
    err = capsys.readouterr().err
    assert "loading weights" in err and "/21" in err  # tensors: 2 layers x 9 + embed, final norm, head

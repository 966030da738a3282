"""A tiny random chat model saved as a Hugging Face folder, for CLI tests that need no download.

Byte-level tokenizer with no merges (ids 0-255 are the 256 bytes, so every text encodes), plus
`<|im_end|>` (256, the EOS) and `<|im_start|>` (257), and a ChatML template like SmolLM2's.
"""

from __future__ import annotations

from pathlib import Path

import jax

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from jaxmodels.convert.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    hf = tokenizers.Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False),
                           AddedToken("<|im_start|>", special=True, normalized=False)])
    return Tokenizer(hf, eos_token_ids=[256], chat_template=CHATML)


def tiny_model_folder(folder: str | Path, max_position_embeddings: int = 256, num_hidden_layers: int = 4) -> Path:
    """Write config.json + model.safetensors + tokenizer files for a tiny random model."""
    from jaxmodels import init_params
    from jaxmodels.convert.hf import save_hf_checkpoint
    from jaxmodels.testing import tiny_config

    config = tiny_config(vocab_size=264, max_position_embeddings=max_position_embeddings,
                         num_hidden_layers=num_hidden_layers, bos_token_id=None, eos_token_id=256)
    params = init_params(config, jax.random.key(0), std=0.2)
    folder = Path(folder)
    save_hf_checkpoint(folder, config, jax.tree_util.tree_map(jax.device_get, params))
    byte_tokenizer().save(folder)
    return folder

"""Inference: batched prefill + on-device decode loop, sampling, and the generate CLI.

    from inference import generate
    result = generate(params, config, [[1, 2, 3]], max_new_tokens=32)

Every argument is checked before any computation (`inference.validate`); a bad one raises
`InferenceError`, a ValueError that names the value and the fix.

The names below load on first use (PEP 562), so `python -m inference.generate` can take over Ctrl-C
before JAX starts importing (which takes seconds).
"""

import importlib

_EXPORTS = {"generate": "inference.engine", "generate_batches": "inference.engine",
            "GenerationResult": "inference.engine", "SamplingConfig": "inference.sampling",
            "filter_logits": "inference.sampling", "select_token": "inference.sampling",
            "InferenceError": "inference.validate"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'inference' has no attribute '{name}'")

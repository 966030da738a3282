"""Inference: batched prefill + on-device decode loop, sampling, and the generate CLI.

    from inference import generate
    result = generate(params, config, [[1, 2, 3]], max_new_tokens=32)

Every argument is checked before any computation (`inference.validate`); a bad one raises
`InferenceError`, a ValueError that names the value and the fix.
"""

from inference.engine import GenerationResult, generate, generate_batches
from inference.sampling import SamplingConfig, filter_logits, select_token
from inference.validate import InferenceError

__all__ = ["generate", "generate_batches", "GenerationResult", "SamplingConfig", "filter_logits", "select_token",
           "InferenceError"]

"""Training for jaxmodels Llama models: `python -m training.train` (see training/train.py).

Modules: `config` (frozen dataclasses, YAML presets, `key=value` overrides), `corpus` (documents and
the held-out split), `data` (BPE tokenizer, token cache, packing, resumable batches), `step` (the pure
train/eval steps and AdamW), `parallel` (mesh, data parallelism, FSDP), `pipeline` / `pipeline_step`
(pipeline stages under shard_map), `handoff` / `acsgd` / `activation_memory` (plain and AC-SGD
compressed hand-offs between stages), `hlo_bytes` (bytes on the wire from compiled HLO), `cluster`
(a local multi-process launcher), `checkpoint` (Orbax, atomic, guarded), `metrics` (metrics.jsonl,
progress bar), `train` (the run and the CLI), `testing`.
"""

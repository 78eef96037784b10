"""Checkpoints: what a model is made of. HF safetensors directories, GGUF files
and the architecture registry (arch/) turn a path into a config and weight
tensors for the engine. May import only the core (_core, _native, errors)."""

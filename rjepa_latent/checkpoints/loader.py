"""A checkpoint path of either format: `open_checkpoint` (HF safetensors
directory or GGUF file) and `read_config` (its public config, no weights read)."""
from __future__ import annotations

import os

from .checkpoint import CheckpointSource, load_hf, load_hf_config


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def open_checkpoint(path: str | os.PathLike, max_layer: int | None = None) -> CheckpointSource:
    """A path ending in .gguf -> the GGUF loader, anything else -> an HF
    directory. A missing path is FileNotFoundError, a malformed one
    ModelFormatError."""
    path = os.fspath(path)
    if _is_gguf(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        from .gguf_loader import load_gguf
        return load_gguf(path, max_layer)
    return load_hf(path, max_layer)


def read_config(path: str | os.PathLike) -> dict:
    """The public config of a checkpoint (as `open_checkpoint(path).config`)
    without reading or validating any weights: for memory plans."""
    path = os.fspath(path)
    if _is_gguf(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        from .gguf_loader import read_gguf_config
        return read_gguf_config(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    return load_hf_config(path)[0]

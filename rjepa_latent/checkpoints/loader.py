"""A checkpoint path of either format: `open_checkpoint` (HF safetensors
directory or GGUF file) and `read_config` (its public config, no weights read)."""
from __future__ import annotations

import os

from .checkpoint import CheckpointSource, hf_storage, load_hf, load_hf_config


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def _existing_gguf(path: str) -> bool:
    """True for a GGUF path (FileNotFoundError when it does not exist), False
    for anything else (an HF directory)."""
    if not _is_gguf(path):
        return False
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    return True


def open_checkpoint(path: str | os.PathLike, max_layer: int | None = None,
                    weights: str | None = None) -> CheckpointSource:
    """A path ending in .gguf -> the GGUF loader, anything else -> an HF
    directory. A missing path is FileNotFoundError, a malformed one
    ModelFormatError. `weights`: "keep", "dequantize" or None (the format's
    default; see `checkpoint_storage`)."""
    path = os.fspath(path)
    if _existing_gguf(path):
        from .gguf_loader import load_gguf
        return load_gguf(path, max_layer, weights)
    return load_hf(path, max_layer, weights)


def checkpoint_storage(path: str | os.PathLike, max_layer: int | None = None,
                       weights: str | None = None) -> tuple[tuple[str, ...], int]:
    """(tensor kinds kept quantized, their stored bytes) when `path` is loaded
    with `weights` (None: keep when the file stores its matrices quantized):
    from the tensor table, no weights read; ((), 0) when nothing is kept."""
    path = os.fspath(path)
    if _existing_gguf(path):
        from .gguf_loader import gguf_storage
        return gguf_storage(path, max_layer, weights)
    return hf_storage(path, max_layer, weights)


def read_config(path: str | os.PathLike) -> dict:
    """The public config of a checkpoint (as `open_checkpoint(path).config`)
    without reading or validating any weights: for memory plans."""
    path = os.fspath(path)
    if _existing_gguf(path):
        from .gguf_loader import read_gguf_config
        return read_gguf_config(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    return load_hf_config(path)[0]

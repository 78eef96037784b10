"""Weights handed to the engine in their stored quantized format.

A checkpoint feed (`CheckpointSource.tensors()`) yields a kept weight as a
`KeptTensor` record with dtype `KEPT_DTYPE` instead of a float buffer; the
model hands it over with `KeptTensor.hand_to`, which copies the stored bytes
into the engine (`_core.Engine.set_tensor_quantized`) and then drops the
source's mapped pages. Which kinds a source keeps, and their stored bytes,
are `KeptSource.keep` and `KeptSource.stored_bytes` (memory plans count
them instead of the dense size).

Design choices:
- Only the GEMM weights and the embedding are kept (`KEEPABLE`): norms and
  biases are tiny and stay float.
- A corrupt tensor (non-finite scale, inconsistent size) is found while its
  bytes are copied, and reported as a ModelFormatError naming the file and
  the tensor.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ModelFormatError
from .checkpoint import CheckpointSource
from .hf_quantized import KEEPABLE, KEPT_DTYPE  # noqa: F401  (defined beside the HF feed)
WEIGHTS_MODES = ("keep", "dequantize")


@dataclass
class KeptSource(CheckpointSource):
    """A CheckpointSource whose feed yields the kinds in `keep` as KeptTensor
    records; `stored_bytes` is what they take as stored."""
    keep: tuple[str, ...] = ()
    stored_bytes: int = 0


@dataclass
class KeptTensor:
    """One kept weight: `blocks` (uint8 [rows, bytes per row], often a view
    of a memory map) of GGML type `ggml_type`, tensor `name` of file `path`."""
    name: str
    path: str
    ggml_type: int
    blocks: np.ndarray
    release: Callable[[], None] = field(default=lambda: None)

    def hand_to(self, engine: Any, kind: str, layer: int, shape: tuple) -> None:
        try:
            engine.set_tensor_quantized(kind, layer, self.blocks, self.ggml_type, tuple(shape))
        except ValueError as e:
            raise ModelFormatError(f"{self.path}: tensor {self.name!r}: {e}") from None
        finally:
            self.blocks = np.empty((0, 0), np.uint8)
            self.release()


def release_pages(memmap: Any, offset: int, nbytes: int) -> None:
    """Drops the pages of [offset, offset + nbytes) of a read-only np.memmap
    from this process's resident memory (MADV_DONTNEED; the file is unchanged
    and a later read faults them in again). A no-op where unsupported."""
    m = getattr(memmap, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if m is None or advice is None or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    start = offset - offset % page
    end = min(offset + nbytes, len(m))
    try:
        m.madvise(advice, start, end - start)
    except (OSError, ValueError):
        pass

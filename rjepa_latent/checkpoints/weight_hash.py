"""A checkpoint's fingerprint over its weights' bytes, hashed as the loader
streams them in.

Design choices:
- Each tensor's stored bytes (as in the file: bfloat16, float16, a GGUF
  quantized block layout ...) get their own sha256, computed in background
  threads (hashlib releases the GIL) from the same memory map the loader reads,
  while the engine converts the previous tensor: no extra read of the file,
  and little extra wall time. The pages hashed are dropped from the map (as
  the loader drops what it copied): hashing lags behind the loader, and
  pages it faulted back in would count in RSS until the map is closed.
- The fingerprint is the sha256 of the header fingerprint (config, tensor
  names, dtypes, shapes) and every tensor's name and digest in name order,
  so it depends on the weights only, not on the order they are fed in.
- Tensors the engine does not read (the layers above `max_layer`) are hashed
  when the fingerprint is asked for, so a model loaded with fewer layers has
  the same fingerprint as the full one.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable

# tensors are hashed in slices of this size so a large one spreads over the threads
_SLICE = 64 << 20


def _digest(buf: Any, begin: int | None, end: int | None) -> str:
    h = hashlib.sha256()
    with memoryview(buf) as mv, mv.cast("B") as flat, flat[begin:end] as region:
        for a in range(0, len(region), _SLICE):
            with region[a:a + _SLICE] as part:
                h.update(part)
            mm = buf if isinstance(buf, mmap.mmap) else \
                getattr(buf, "_mmap", None) if getattr(buf, "offset", None) == 0 else None
            if mm is not None:   # a file map, or a np.memmap of a whole file
                _drop(mm, (begin or 0) + a, (begin or 0) + a + _SLICE)
    return h.hexdigest()


def _drop(mm: mmap.mmap, begin: int, end: int) -> None:
    """Hashed pages of a file map leave resident memory (a file map's pages
    count in the process's RSS until dropped; the loader drops what it copied,
    but hashing may touch them again after that). Read-only: a later read
    faults them in from the file again."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    start = begin - begin % mmap.PAGESIZE
    end = min(end, len(mm))
    if advice is not None and end > start:
        try:
            mm.madvise(advice, start, end - start)
        except (OSError, ValueError):
            pass


class WeightHasher:
    """Collects each tensor's digest; `fingerprint(read)` combines them."""

    def __init__(self, header_fingerprint: str, names: Iterable[str]):
        self.header = header_fingerprint
        self.names = sorted(set(names))
        self._futures: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=max(1, min(4, (os.cpu_count() or 1) - 1)), thread_name_prefix="rjepa-hash")
        self._result: str | None = None

    def add(self, name: str, buf: Any, begin: int | None = None, end: int | None = None) -> None:
        """Hash tensor `name`'s stored bytes `buf[begin:end]` (`buf` kept valid
        until `fingerprint` or `close` returns) in the background."""
        if self._pool is not None and name not in self._futures:
            self._futures[name] = self._pool.submit(_digest, buf, begin, end)

    def fingerprint(self, read: Callable[[str], Any]) -> str:
        """The combined fingerprint; `read(name)` gives the stored bytes of a
        tensor that was not added (read now)."""
        if self._result is None:
            for name in self.names:
                if name not in self._futures:   # one at a time: only one such tensor in memory
                    done: Future = Future()
                    done.set_result(_digest(read(name), None, None))
                    self._futures[name] = done
            h = hashlib.sha256(f"weights-sha256:{self.header}".encode())
            for name in self.names:
                h.update(f"\n{name}:{self._futures[name].result()}".encode())
            self._result = h.hexdigest()
            self.close()
        return self._result

    def close(self) -> None:
        """Wait for the hashing threads (they hold views of the loader's maps)."""
        if self._pool is not None:
            for f in self._futures.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None

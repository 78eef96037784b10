"""What a reader keeps per record, kept small: the id index, lazily read
sidecar rows and the `ids` sequence of `LatentStore`.

Design choices (memory flat in the number of records):
- Opening a run streams every sidecar once to check its size, sha256 and
  line count (nothing of it is kept); rows are read again when a shard is
  used: all of a shard's rows for iteration (a few shards cached), or a single
  line for random access (the line's byte offsets, 8 bytes per record, kept for
  the shards touched).
- Lookup by id uses an index built on the first lookup: each id's 64-bit hash,
  sorted, with its position (12 bytes per record, numpy arrays, no Python
  object per record). A hash match is confirmed against the stored id, so a
  collision never returns another record.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import StoreError

# `store` below is a read.LatentStore (not imported: read.py imports this module)
LatentStore = Any
MAX_CACHED_SIDECARS = 8   # shards whose parsed rows a reader keeps (iteration, exports)
_FIX = "; `rjepa-latent extract ... --repair` redoes the shard"
# a sidecar line as the writer makes it: the id first (json.dumps of the row)
_ID_FIRST = re.compile(rb'^\{"id": "((?:[^"\\\n]|\\.)*)"', re.M)


def _sidecar_bytes(path: Path, entry: dict) -> bytes:
    """The sidecar's bytes, after checking size, sha256 and line count against
    the manifest entry (the messages of `files._read_sidecar`)."""
    info = entry["files"].get(path.name, {})
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{path}: cannot read the shard's metadata ({e.strerror}){_FIX}") from None
    if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise StoreError(f"{path}: size or sha256 differs from the manifest's (the file was changed "
                         f"after it was written){_FIX}")
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if lines != entry["items"]:
        raise StoreError(f"{path}: {lines} lines, the manifest says {entry['items']}")
    return data


def check_sidecar(path: Path, entry: dict) -> None:
    """Raise StoreError unless the shard's sidecar matches its manifest entry."""
    _sidecar_bytes(path, entry)


def sidecar_path(store: LatentStore, si: int) -> Path:
    return store.path / f"shard-{store.shards[si]['index']:05d}.jsonl"


def _parse_line(path: Path, line: bytes, n: int) -> dict:
    try:
        return json.loads(line.decode("utf-8", errors="replace"))
    except ValueError as e:
        raise StoreError(f"{path}: line {n} is not JSON ({e}){_FIX}") from None


class SidecarLines:
    """Byte offsets of each line of the sidecars touched, for reading one row."""

    def __init__(self) -> None:
        self._starts: dict[int, np.ndarray] = {}

    def row(self, store: LatentStore, si: int, j: int) -> dict:
        path = sidecar_path(store, si)
        starts = self._starts.get(si)
        if starts is None:
            data = _sidecar_bytes(path, store.shards[si])
            ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10).astype(np.int64) + 1
            starts = np.concatenate([[0], ends]).astype(np.int64)
            if starts[-1] != len(data):   # a last line without its newline
                starts = np.append(starts, len(data))
            self._starts[si] = starts
        a, b = int(starts[j]), int(starts[j + 1])
        try:
            with open(path, "rb") as f:
                f.seek(a)
                line = f.read(b - a)
        except OSError as e:
            raise StoreError(f"{path}: cannot read the shard's metadata ({e.strerror}){_FIX}") from None
        return _parse_line(path, line.rstrip(b"\n"), j + 1)


def _shard_ids(store: LatentStore, si: int) -> list[str]:
    path = sidecar_path(store, si)
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    raw = _ID_FIRST.findall(data)
    if len(raw) != int(store.shards[si]["items"]):   # not the writer's layout: parse every row
        return [r["id"] for r in store.shard_meta(si)]
    return [json.loads(b'"' + r + b'"') if b"\\" in r else r.decode("utf-8", errors="replace")
            for r in raw]


class IdIndex:
    """Sorted 64-bit hashes of every id with their positions."""

    def __init__(self, hashes: np.ndarray, positions: np.ndarray):
        self.hashes = hashes
        self.positions = positions

    @classmethod
    def build(cls, store: LatentStore) -> "IdIndex":
        n = len(store)
        hashes = np.empty(n, np.int64)
        for si in range(len(store.shards)):
            a = int(store._starts[si])
            ids = _shard_ids(store, si)
            hashes[a:a + len(ids)] = np.fromiter((hash(x) for x in ids), np.int64, len(ids))
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        del hashes
        return cls(sorted_hashes, order.astype(np.int32 if n < 2**31 else np.int64))

    def find(self, store: LatentStore, item_id: str) -> int | None:
        if not isinstance(item_id, str):
            return None
        h = hash(item_id)
        lo = int(np.searchsorted(self.hashes, h, side="left"))
        hi = int(np.searchsorted(self.hashes, h, side="right"))
        for pos in sorted((int(p) for p in self.positions[lo:hi]), reverse=True):   # the last wins
            if store.row(*store.locate(pos)).get("id") == item_id:
                return pos
        return None


class IdList(Sequence):
    """The ids of a run's items in position order, read from the sidecars when
    asked (a list of millions of ids is not kept). Compares equal to a list or
    tuple of the same ids; slices are lists; `in` uses the id index."""

    def __init__(self, store: LatentStore):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(n))]
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"ids are indexed by int or slice, not {type(key).__name__}")
        pos = int(key) + (n if key < 0 else 0)
        if not 0 <= pos < n:
            raise IndexError(f"id index {key} out of range for {n} items")
        return self._store.row(*self._store.locate(pos))["id"]

    def __iter__(self) -> Iterator[str]:
        for si in range(len(self._store.shards)):
            yield from (r["id"] for r in self._store.shard_meta(si))

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._store.position_of(item_id) is not None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, IdList)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None   # mutable-sequence semantics: compared by content

    def __repr__(self) -> str:
        n = len(self)
        head = self[:5]
        return repr(head)[:-1] + (f", ... ({n:,} ids)]" if n > 5 else "]")

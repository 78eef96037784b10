"""PyTorch datasets over a run directory (needs torch: pip install torch, or
pip install ".[torch]" in a clone of rjepa-latent).

- `LatentDataset(run, layer=-2, pooling=None)`: map-style, one record per
  item: a dict with `id`, `latents` (torch.Tensor [num_steps, hidden] of the
  chosen stored pooling, default the run's first: a private copy of the
  item's own rows (steps x hidden, a few KB) out of the shard's read-only
  memory map, so it is writable, torch does not warn, and an in-place change
  never shows in the file, another item or a later epoch — zero-copy would
  need either a shared writable mapping (in-place changes leak into later
  epochs) or one mapping per item (one open file each: a DataLoader keeping
  thousands of items runs out of descriptors)), `num_steps`, `num_tokens` and the record's carried metadata. On a
  per-token run (pooling "none"): `latents` [num_tokens, hidden] (a row per
  token) and `token_steps` (int32 [num_tokens], each token's step, -1 outside
  every step), for SAE and probe training.
- `collate_steps(items)`: pads `latents` to the longest record of the batch
  ([B, max_rows, hidden]) and adds `mask` (bool [B, max_rows], True on real
  rows); `token_steps` is padded with -1; other fields become lists (or a
  tensor for `num_steps`, `num_tokens`). It is the default: a LatentDataset
  item is a `StepItem` (a dict), which torch's default collate hands to
  `collate_steps`, so `DataLoader(LatentDataset(run), batch_size=8)` works
  as it stands; `LatentDataset(run).loader(batch_size=8, ...)` is the same
  DataLoader with `collate_steps` named explicitly.
- `StepPairs(run, layer=-2, offset=1, pooling=None)`: every (z_t, z_{t+offset})
  pair of steps within one record, the unit a JEPA-style next-step predictor
  trains on: a dict with `z_t`, `z_next`, `id`, `step` (= t). Per-token runs
  have no step latents: refused.

Both datasets open the run lazily in each process, so they work with
`DataLoader(num_workers > 0)` (what is pickled is the path and the options).
bfloat16 runs give bfloat16 tensors (the same memory, re-viewed).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..store.read import LatentStore, open_latents, stored_layer, stored_pooling


try:
    import torch
    from torch.utils.data import Dataset
except ImportError:  # pragma: no cover - exercised by a test that hides torch
    raise ImportError("rjepa_latent.torch needs PyTorch: pip install torch") from None



class _RunDataset(Dataset):
    """Holds the path and opens the run on first use in each process."""

    def __init__(self, run: str | os.PathLike, layer: int, pooling: str | None):
        self.run = os.fspath(run)
        store = open_latents(self.run)   # opened once here; a worker process opens its own
        self.layer = layer
        self._pos = stored_layer(store, layer)
        self.pooling = stored_pooling(store, pooling)
        self.per_token = store.per_token
        self._bf16 = store.config["dtype"] == "bfloat16"
        self._store: LatentStore | None = store

    @property
    def store(self) -> LatentStore:
        if self._store is None:
            self._store = open_latents(self.run)
        return self._store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None   # mmaps do not pickle; each worker maps the shards itself
        return state

    def _rows(self, item) -> np.ndarray:
        """The item's stored rows of this dataset's layer, or site (`layer` a site name)."""
        if isinstance(self._pos, str):
            return item.raw_site(self._pos, self.pooling)
        return item.raw_pooled(self.pooling)[self._pos]

    def _tensor(self, arr: np.ndarray) -> "torch.Tensor":
        t = torch.from_numpy(np.array(arr))   # the item's own rows (see the module docstring)
        return t.view(torch.bfloat16) if self._bf16 else t


class StepItem(dict):
    """A LatentDataset item: a dict whose batches torch's default collate
    builds with `collate_steps` (records have different numbers of steps)."""


class LatentDataset(_RunDataset):
    """One record per item (see the module docstring)."""

    def loader(self, batch_size: int = 8, **kwargs: Any) -> "torch.utils.data.DataLoader":
        """A DataLoader over this dataset whose batches are `collate_steps`'s
        (padded `latents`, `mask`); other keyword arguments go to DataLoader."""
        from torch.utils.data import DataLoader
        kwargs.setdefault("collate_fn", collate_steps)
        return DataLoader(self, batch_size=batch_size, **kwargs)

    def __init__(self, run: str | os.PathLike, layer: int = -2, pooling: str | None = None):
        super().__init__(run, layer, pooling)
        self._len = len(self.store)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        item = self.store[i]
        out = StepItem(item.meta)
        out["latents"] = self._tensor(self._rows(item))
        if self.per_token:
            out["token_steps"] = torch.from_numpy(np.array(item.token_steps))
        return out


def collate_steps(items: list[dict]) -> dict:
    """Pad `latents` to the batch's longest record; `mask` marks real steps."""
    if not items:
        raise ValueError("collate_steps got an empty batch")
    lats = [it["latents"] for it in items]
    steps = max(x.shape[0] for x in lats)
    hidden = lats[0].shape[1]
    out_lat = lats[0].new_zeros((len(lats), steps, hidden))
    mask = torch.zeros((len(lats), steps), dtype=torch.bool)
    for b, x in enumerate(lats):
        out_lat[b, :x.shape[0]] = x
        mask[b, :x.shape[0]] = True
    out: dict[str, Any] = {"latents": out_lat, "mask": mask}
    if "token_steps" in items[0]:
        ts = torch.full((len(lats), steps), -1, dtype=torch.int32)
        for b, it in enumerate(items):
            ts[b, :it["token_steps"].shape[0]] = it["token_steps"]
        out["token_steps"] = ts
    for k in items[0]:
        if k in ("latents", "token_steps"):
            continue
        vals = [it.get(k) for it in items]
        out[k] = torch.tensor(vals) if k in ("num_steps", "num_tokens") else vals
    return out


def _register_default_collate() -> None:
    """Lets torch's default collate build StepItem batches with collate_steps
    (its per-type table; a torch without one needs `loader()` or collate_fn)."""
    try:
        from torch.utils.data._utils.collate import default_collate_fn_map
    except ImportError:  # pragma: no cover - older torch
        return
    default_collate_fn_map.setdefault(StepItem, lambda batch, collate_fn_map=None: collate_steps(batch))


_register_default_collate()


class StepPairs(_RunDataset):
    """(z_t, z_{t+offset}) of every record with more than `offset` steps."""

    def __init__(self, run: str | os.PathLike, layer: int = -2, offset: int = 1,
                 pooling: str | None = None):
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 1:
            raise ValueError(f"offset must be a positive int, got {offset!r}")
        super().__init__(run, layer, pooling)
        if self.per_token:
            raise ValueError(f"{self.run} is a per-token run (pooling 'none'): it has no step "
                             "latents to pair; use LatentDataset, or extract with a span pooling")
        self.offset = offset
        store = self.store
        # numpy arrays, no Python object per record (runs of millions of records)
        counts = np.fromiter((max(int(row["num_steps"]) - offset, 0)
                              for si in range(len(store.shards)) for row in store.shard_meta(si)),
                             np.int64, len(store))
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._records = np.flatnonzero(counts)   # positions with pairs
        self._first = self._starts[self._records]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        i = int(i) + (n if i < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"pair index {i} out of range for {n} pairs")
        k = int(np.searchsorted(self._first, i, side="right")) - 1
        p = int(self._records[k])
        t = i - int(self._first[k])
        item = self.store[p]
        lat = self._rows(item)
        return {"z_t": self._tensor(lat[t]), "z_next": self._tensor(lat[t + self.offset]),
                "id": item.id, "step": t}

"""`TokenBatches(store, site, batch_size, shuffle_buffer=0, ...)`: torch batches
of a token store's rows (`rjepa-latent tokens`), for SAE and probe training.

An `IterableDataset` yielding `[batch_size, width]` tensors (bfloat16 stores
give bfloat16 tensors; `keys=True` yields `(rows, keys)` with keys int32
`[batch_size, 3]`: record, position, token_id). The store is shuffled
globally already, so reading chunks in order is one epoch of a uniformly
shuffled dataset; `shuffle_buffer=N` reshuffles every epoch on top of it
(chunk order permuted, rows mixed in a buffer of about N rows; `set_epoch`
changes the draw). Memory: one chunk plus the buffer. With a DataLoader of
several workers (`batch_size=None` on the DataLoader: each item is a batch
already), each worker reads every n-th chunk.
"""
from __future__ import annotations

import os

import numpy as np

from ..store.files import STORE_DTYPES
from ..store.token_store import KEY_COLUMNS, TokenStore

try:
    import torch
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover - exercised by a test that hides torch
    raise ImportError("rjepa_latent.torch needs PyTorch: pip install torch") from None


class TokenBatches(IterableDataset):
    """Batches of one site of a token store (see the module docstring)."""

    def __init__(self, store: str | os.PathLike, site: str | None = None, batch_size: int = 4096, *,
                 shuffle_buffer: int = 0, seed: int = 0, drop_last: bool = False, keys: bool = False):
        for name, v, low in (("batch_size", batch_size, 1), ("shuffle_buffer", shuffle_buffer, 0),
                             ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self.path = os.fspath(store)
        ts = TokenStore(self.path)
        self.site = ts._site(site or ts.sites[0])
        self.rows, self.chunks, self.width, self.dtype = ts.rows, ts.chunks, ts.widths[self.site], ts.dtype
        self.batch_size, self.shuffle_buffer, self.seed = int(batch_size), int(shuffle_buffer), int(seed)
        self.drop_last, self.keys = bool(drop_last), bool(keys)
        self.epoch = 0
        self._store: TokenStore | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle the next iteration draws (with shuffle_buffer)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.rows // self.batch_size if self.drop_last else -(-self.rows // self.batch_size)

    def _tensor(self, rows: np.ndarray):
        t = torch.from_numpy(rows)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def __iter__(self):
        if self._store is None:   # opened in each process
            self._store = TokenStore(self.path)
        info = torch.utils.data.get_worker_info()
        order = np.arange(self.chunks)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle_buffer:
            order = rng.permutation(order)
        if info is not None:
            order = order[info.id::info.num_workers]
        if self.shuffle_buffer:
            yield from self._shuffled(order, rng)
            return
        bs = self.batch_size
        need = bs
        pend: list[tuple] = []
        held = 0
        for c in order:
            x = self._store.chunk(self.site, int(c))      # a fresh array: batches are views of it
            k = np.stack([self._store.keys(int(c))[n] for n in KEY_COLUMNS], 1) if self.keys else None
            pend.append((x, k))
            held += len(x)
            if held < need:
                continue
            xs, ks = self._joined(pend)
            full = len(xs) // bs * bs
            for a in range(0, full, bs):
                yield self._out(xs[a:a + bs], ks[a:a + bs] if self.keys else None)
            pend = [(xs[full:], ks[full:] if self.keys else None)] if full < len(xs) else []
            held = len(xs) - full
        if held:
            xs, ks = self._joined(pend)
            end = held - held % bs if self.drop_last else held
            for a in range(0, end, bs):
                yield self._out(xs[a:a + bs], ks[a:a + bs] if self.keys else None)

    def _shuffled(self, order: np.ndarray, rng: np.random.Generator):
        """Chunks read straight into one buffer of about `shuffle_buffer` rows;
        each batch is a random draw of its rows (a fresh array), the rows not
        drawn stay for the next fill."""
        bs, ts = self.batch_size, self._store
        chunk_rows = int(ts.config["chunk_rows"])
        cap = max(self.shuffle_buffer, bs) + chunk_rows
        buf = np.empty((cap, self.width), STORE_DTYPES[self.dtype][1])
        kbuf = np.empty((cap, 3), np.int32) if self.keys else None
        fill = 0
        for i, c in enumerate(order):
            n = ts.read_rows_into(self.site, int(c), buf[fill:])
            if self.keys:
                k = ts.keys(int(c))
                kbuf[fill:fill + n] = np.stack([k[name] for name in KEY_COLUMNS], 1)
            fill += n
            last = i == len(order) - 1
            if fill < max(self.shuffle_buffer, bs) and not last:
                continue
            perm = rng.permutation(fill)
            full = fill // bs * bs
            end = fill if last and not self.drop_last else full
            for a in range(0, end, bs):
                take = perm[a:a + bs]
                yield self._out(buf[take], kbuf[take] if self.keys else None)
            rest = perm[full:] if not last else perm[:0]
            buf[:len(rest)] = buf[rest]
            if self.keys:
                kbuf[:len(rest)] = kbuf[rest]
            fill = len(rest)

    def _joined(self, pend: list[tuple]):
        if len(pend) == 1:
            return pend[0]
        return (np.concatenate([x for x, _ in pend]),
                np.concatenate([k for _, k in pend]) if self.keys else None)

    def _out(self, x: np.ndarray, k: np.ndarray | None):
        # x is a view of an array this iteration made (read, joined or permuted), no one else's
        t = self._tensor(x)
        return (t, torch.from_numpy(k)) if self.keys else t

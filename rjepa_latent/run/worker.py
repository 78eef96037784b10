"""`ShardWorker`: computes one shard and commits it (no lock), and the disk
check before a shard is written."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..engine.model import Model, TOKEN_POOLING
from ..engine.plan import plan_batches
from ..errors import InputError, StoreError, TokenIdError
from ..inputs.data import ErrorRecord, Record
from ..inputs.tokenize import Item, tokenize_records
from ..inputs.select import selected_positions, special_token_ids, trimmed_spans
from ..store.token_rows import outlier_marks, row_norms, site_norms
from ..store.files import STORE_DTYPES, convert_latents
from ..store.write import check_run_config, commit_shard
from .driver import EXTENT, RunDriver, _stored_config
from .spec import AUTO, RunSpec, batch_budget, run_config, run_tokenizer


class ShardWorker:
    """The worker's side: a loaded Model and the run's spec; `run_shard(k, (start,
    end), records)` tokenizes, checks, plans, computes, converts and commits one
    shard (files + journal entry, atomic and fsynced) and returns a small
    picklable summary. Takes no lock (the driver holds it): other processes may
    commit other shards into the same directory at the same time. `prepare`,
    `compute` and `commit` are its three stages (the single-process pipeline runs
    them in three threads)."""

    def __init__(self, m: Model, spec: RunSpec, out: str | os.PathLike, config: dict | None = None):
        self.m, self.spec, self.out = m, spec, Path(out)
        self.config = config if config is not None else run_config(spec, m)
        self.layers = self.config["layers"]
        self.sites = self.config.get("sites") or None   # a run of activation sites
        self.pooling = spec.pooling_value
        self.store_dtype = self.config["dtype"]
        self.budget = batch_budget(spec, m)
        self.tok = run_tokenizer(spec, m)
        self.max_text_tokens = self.config["max_tokens"]
        self.per_token = self.pooling == TOKEN_POOLING
        self.kernel = m.kernel
        self._run_config: dict | None = None
        self.selection = self.config.get("token_selection")
        self.outliers = self.config.get("outliers")
        if self.selection is not None:
            self._select = dict(special_ids=special_token_ids(getattr(self.tok, "_tok", self.tok)),
                                drop_bos=self.selection["drop_bos"])

    def run_config(self) -> dict:
        """The stored run's configuration, checked against this worker's (once):
        a worker with another engine or options never commits into the run."""
        if self._run_config is None:
            stored = _stored_config(self.out)
            if stored is None:
                raise StoreError(f"{self.out} holds no run yet (no manifest.json): the driver "
                                 "creates it (RunDriver.pending / start) before workers commit")
            ignore = EXTENT + (("shard_size",) if self.spec.shard_size == AUTO else ())
            check_run_config(self.out, stored, self.config, self.spec.allow_kernel_change, ignore)
            self._run_config = stored
        return self._run_config

    def prepare(self, k: int, rng: tuple[int, int], records: list) -> dict:
        """Tokenize, check and plan one shard: items and their checked sequences
        (input order), errors, planned batches."""
        done = tokenize_records(self.tok, [r for r in records if isinstance(r, Record)], self.max_text_tokens)
        errors = [r for r in records if isinstance(r, ErrorRecord)] + \
            [t for t in done if isinstance(t, ErrorRecord)]
        good = []
        for t in sorted((t for t in done if isinstance(t, Item)), key=lambda it: it.index):
            spans = t.spans
            if self.selection is not None:   # the kept positions travel with the item
                t.keep = selected_positions(t.ids, t.spans, self.selection["tokens"], offsets=t.offsets,
                                            content=t.content, **self._select)
                if not self.per_token:
                    spans, reason = trimmed_spans(t.spans, t.keep, len(t.ids))
                    if reason is not None:
                        errors.append(ErrorRecord(t.index, t.id, t.source, t.line, reason))
                        continue
            try:
                good.append((t, self.m.check(t.ids, None if self.per_token else spans,
                                             per_token=self.per_token, name="ids", spans_name="spans")))
            except InputError as e:
                errors.append(ErrorRecord(t.index, t.id, t.source, t.line, _refusal(e)))
        checked = [c for _, c in good]
        return {"index": k, "records": tuple(rng), "items": [t for t, _ in good], "checked": checked,
                "errors": errors,
                "batches": plan_batches([c.ids.size for c in checked], self.budget,
                                        [c.spans.shape[0] for c in checked])}

    def compute(self, shard: dict, on_batch=None) -> tuple:
        """Run the engine over the shard's planned batches: one engine call per
        planned batch, exactly that batch; `on_batch(n_items, n_tokens, seconds)`."""
        items: list[Item] = shard["items"]
        checked = shard["checked"]
        results: list[np.ndarray | None] = [None] * len(items)
        for batch in shard["batches"]:
            n_tok = int(sum(checked[i].ids.size for i in batch))
            t = time.perf_counter()
            res = self.m.run_batch([checked[i] for i in batch], self.layers, self.pooling,
                                   sites=self.sites)
            dt = time.perf_counter() - t
            for i, r in zip(batch, res):
                results[i] = r
            if on_batch is not None:
                on_batch(len(batch), n_tok, dt)
        return shard["index"], tuple(shard["records"]), items, results, shard["errors"]

    def commit(self, job: tuple) -> dict:
        """Convert a computed shard to the stored dtype (items it cannot represent
        become errors) and commit it; returns its journal entry."""
        index, records, items, results, errors = job
        good, lats, errors, rows = [], [], list(errors), []
        for it, r in zip(items, results):
            if self.sites:   # a dict: site -> rows (per token: [rows, width])
                r = {name: np.asarray(r[name], dtype=np.float32) for name in self.sites}
                if self.per_token and self.selection is not None:
                    r = {name: a[..., it.keep, :] for name, a in r.items()}
                lat, reason = convert_sites(r, self.store_dtype)
            else:
                r = np.asarray(r, dtype=np.float32)
                if self.per_token and self.selection is not None:
                    r = r[:, it.keep]
                lat, reason = convert_latents(r, self.store_dtype)
            if reason is None:
                good.append(it)
                lats.append(lat)
                if self.per_token and self.selection is not None:
                    rows.append({"positions": it.keep, "norms": site_norms(r) if self.sites else row_norms(r)})
            else:
                errors.append(ErrorRecord(it.index, it.id, it.source, it.line, reason))
        errors.sort(key=lambda e: e.index)
        if self.outliers is not None:
            lats = mark_outliers(rows, lats, self.outliers["k"], self.outliers["drop"])
        return commit_shard(self.out, self.run_config(), index, records, good, lats,
                            [e.to_json() for e in errors], self.kernel,
                            token_rows=rows if self.per_token and self.selection is not None else None)

    def run_shard(self, k: int, rng: tuple[int, int], records: list) -> dict:
        """All of one shard, here; returns {index, records, items, steps, tokens,
        errors, seconds, entry} (entry: the committed journal entry, for the driver)."""
        t = time.perf_counter()
        self.run_config()
        with self.m.workspace_for(self.budget):
            entry = self.commit(self.compute(self.prepare(k, rng, records)))
        return {"index": k, "records": list(rng), "items": entry["items"], "steps": entry["steps"],
                "tokens": entry["tokens"], "errors": len(entry["errors"]),
                "seconds": time.perf_counter() - t, "entry": entry}


def mark_outliers(rows: list[dict], lats: list[np.ndarray], k: float, drop: bool) -> list[np.ndarray]:
    """Mark each row whose norm is over k x its layer's median norm over the
    shard's rows (`rows[i]["outliers"]`, bool [n_layers, rows]); with `drop`,
    leave out the rows marked in any layer (from the latents and the rows)."""
    counts = [r["norms"].shape[1] for r in rows]
    allnorms = np.concatenate([r["norms"] for r in rows], axis=1) if rows else np.zeros((0, 0), np.float32)
    marks = outlier_marks(allnorms, k) if rows else allnorms.astype(bool)
    out, at = [], 0
    for r, lat, c in zip(rows, lats, counts):
        mark = marks[:, at:at + c]
        at += c
        r["outliers"] = mark
        r["marked"] = int(mark.any(axis=0).sum())
        if drop:
            kept = ~mark.any(axis=0)
            r["positions"], r["norms"], r["outliers"] = r["positions"][kept], r["norms"][:, kept], mark[:, kept]
            lat = {name: a[:, kept] for name, a in lat.items()} if isinstance(lat, dict) else lat[:, kept]
        out.append(lat)
    return out


def _check_disk(driver: RunDriver, worker: ShardWorker) -> int:
    """A per-token run stores tokens x layers x hidden values (+ 4 bytes of step
    index per token): counts the tokens of the shards still to do (tokenized
    here, in a first pass over the records, so records that fail tokenization
    count nothing), prints the need, and raises StoreError when
    `shutil.disk_usage` of `out` (or its nearest existing parent) has less free.
    Returns the bytes needed."""
    out = driver.out
    i, n = driver.spec.part
    tokens = 0
    for k, rng, recs in driver._chunks():
        if k % n != i or driver._kept(k, rng):
            continue
        good = [r for r in recs if isinstance(r, Record)]
        tokens += sum(len(t.ids) for t in tokenize_records(worker.tok, good, worker.max_text_tokens)
                      if isinstance(t, Item))
    driver.num_records = None   # the real pass counts them again
    n_layers, hidden = len(worker.layers), worker.m.hidden_size
    if worker.sites:   # a run of sites: one row of all the sites' widths per token
        n_layers, hidden = 1, sum(worker.config["site_widths"])
    itemsize = np.dtype(STORE_DTYPES[worker.store_dtype][1]).itemsize
    need = tokens * (n_layers * hidden * itemsize + 4)
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    gib = 1024 ** 3
    print(f"rjepa-latent extract: per-token output: {tokens:,} tokens x {n_layers} "
          f"layer{'s' if n_layers != 1 else ''} x "
          f"{hidden} hidden x {itemsize} bytes (+ 4 bytes of step index per token) = "
          f"{need / gib:.3f} GiB; {free / gib:.3f} GiB free on {where}", file=sys.stderr)
    if need > free:
        raise StoreError(f"not enough disk for a per-token run in {out}: it needs {need:,} bytes "
                         f"({need / gib:.3f} GiB: {tokens:,} tokens x {n_layers} layers x {hidden} "
                         f"hidden in {worker.store_dtype}) but {where} has {free:,} bytes free; free "
                         f"space, or use another --out, fewer --layers or a smaller --dtype; "
                         f"nothing was written")
    return need


def convert_sites(res: dict, dtype: str) -> tuple[dict | None, str | None]:
    """convert_latents of each site of one item: site -> [n_poolings, rows, width]."""
    out = {}
    for name, arr in res.items():
        arr = np.asarray(arr, dtype=np.float32)
        lat, reason = convert_latents(arr if arr.ndim == 3 else arr[None], dtype)
        if reason is not None:
            return None, f"{name}: {reason}"
        out[name] = lat
    return out, None


def _refusal(e: InputError) -> str:
    """The errors.jsonl reason of a tokenized record the engine cannot take."""
    hint = "; the tokenizer does not match the model" if isinstance(e, TokenIdError) else ""
    return f"the engine cannot take this record's tokens: {e}{hint}"

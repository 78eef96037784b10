"""A run directory as the formats training code reads: Arrow tables, HF
`datasets`, Parquet files, flat `.npy` arrays; and `rjepa-latent export`.

Layout of every table (one row per record):
  id         string
  latents    list<fixed_size_list<float32, hidden>>   [num_steps, hidden] of one layer
                                                      and one pooling (`pooling=`,
                                                      default the run's first)
  num_steps  int64
  num_tokens int64
  ...        every carried metadata field of the record
Per-token runs (pooling "none") have the same table with `latents`
[num_tokens, hidden] (a row per token, not per step) and one more column,
`token_steps` list<int32> [num_tokens] (each token's step, -1 outside every
step), plus `token_positions` and `token_ids` (each row's position and token
id) where the run stores them; `export_npy` writes `token_offsets.npy` and
`token_steps.npy` (and `token_positions.npy`, `token_ids.npy`) in place of
`step_offsets.npy`.
This is the layout HF `datasets` reads (its `Array2D` and Ray's / pyarrow's
tensor extension types are not interchangeable between them), and pyarrow
reads it back without a copy. The latents column is built over the shard's
memory map: no copy until a writer needs one.

Stored dtypes: float32 and float16 stay themselves (Arrow halffloat for
float16). Arrow has no bfloat16: bf16 runs store uint16 with the field
metadata {"dtype": "bfloat16"}; `bf16_view` re-views such values as
`ml_dtypes.bfloat16`. HF `datasets` reads that column as integers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import latents_tensor, site_tensor
from .read import (LatentStore, _need, arrow_parts, open_latents, output_width, row_offsets_name, shards,
                   stored_layer, stored_pooling, with_json_fallback)


def export_parquet(store: LatentStore, out: str | os.PathLike, layer: int = -2,
                   row_group_rows: int = 1024, pooling: str | None = None) -> dict:
    """One Parquet file, one row per record, written without dictionary
    encoding (latent floats do not repeat) in row groups of `row_group_rows`;
    one layer and one pooling (default the run's first). Written a shard at a
    time (memory does not grow with the run)."""
    pa = _need("pyarrow")
    import pyarrow.parquet as pq
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")

    def write(as_json) -> int:
        schema, tables = arrow_parts(store, layer, pooling, as_json)
        rows, pending, buffered = 0, [], 0
        with pq.ParquetWriter(tmp, schema, use_dictionary=False, compression="zstd") as w:
            for t in tables:   # whole row groups as they fill up: the layout of one write_table
                pending.append(t)
                buffered += t.num_rows
                if buffered >= row_group_rows:
                    joined = pa.concat_tables(pending)
                    full = buffered - buffered % row_group_rows
                    w.write_table(joined.slice(0, full), row_group_size=row_group_rows)
                    pending, buffered = [joined.slice(full)], buffered - full
                    rows += full
            if buffered or rows == 0:
                w.write_table(pa.concat_tables(pending) if pending else schema.empty_table(),
                              row_group_size=row_group_rows)
                rows += buffered
        return rows

    try:
        rows = with_json_fallback(write)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"out": str(out), "rows": rows, "bytes": out.stat().st_size}


def export_npy(store: LatentStore, out: str | os.PathLike, layers: Sequence[int] | None = None,
               pooling: str | None = None) -> dict:
    """A directory of flat arrays a training loop memory-maps:
    `latents.layer-K.npy` [total_steps, hidden] per layer (K the hidden-state
    index) of one pooling (default the run's first), `step_offsets.npy` int64
    [records + 1], `items.jsonl` (one line of metadata per record, same order).
    Per-token runs: `latents.layer-K.npy` [total_tokens, hidden],
    `token_offsets.npy` int64 [records + 1] and `token_steps.npy` int32
    [total_tokens] (and `token_positions.npy`, `token_ids.npy` where the run
    stores them) instead of step_offsets.npy. A run of activation sites
    writes `<site>.npy` [rows, width] per site instead (`layers`: site names,
    default all). bf16 runs are written as uint16
    bits. Written into a temporary directory beside `out` and renamed at the
    end: an interrupted export leaves no `out`; an existing non-empty `out` is
    refused (no stale files of an earlier export mixed in)."""
    pooling = stored_pooling(store, pooling)
    stored = [int(x) for x in store.config["layers"]]
    if store.sites:
        wanted = list(store.sites) if layers is None else [stored_layer(store, k) for k in layers]
    else:
        wanted = stored if layers is None else [stored[stored_layer(store, k)] for k in layers]
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ValueError(f"{final} exists and is not an empty directory; export into a new one")
    out = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        res = _write_npy(store, out, stored, wanted, pooling)
        if final.exists():
            final.rmdir()
        os.replace(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    res["out"] = str(final)
    return res


class _NpyWriter:
    """A .npy file written front to back with plain writes (a memory map's
    dirty pages would count in the process's memory until it is closed):
    the same bytes np.save writes for the finished array."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.f = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": shape})
        self.dtype = np.dtype(dtype)

    def write(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, dtype=self.dtype).data)

    def close(self) -> None:
        self.f.close()


def _write_npy(store: LatentStore, out: Path, stored: list[int], wanted: list[int],
               pooling: str) -> dict:
    # written a shard at a time: memory flat in the run's size
    rows_key = "tokens" if store.per_token else "steps"
    total = sum(int(s[rows_key]) for s in store.shards)
    files = []
    for k in wanted:
        site = isinstance(k, str)
        pos = k if site else stored.index(k)
        hidden = output_width(store, pos)
        tensor = site_tensor(store.poolings, pooling, k) if site else \
            latents_tensor(store.poolings, pooling)
        name = out / (f"{k}.npy" if site else f"latents.layer-{k}.npy")
        first = store.shard_arrays(0)[tensor] if store.shards else None
        w = _NpyWriter(name, first.dtype if first is not None else np.float32, (total, hidden))
        try:
            for lat, _, _ in shards(store, pos, pooling):
                w.write(lat)
        finally:
            w.close()
        files.append(name.name)
    offsets_name = row_offsets_name(store) + ".npy"
    w = _NpyWriter(out / offsets_name, np.int64, (sum(int(s["items"]) for s in store.shards) + 1,))
    try:
        w.write(np.zeros(1, np.int64))
        at = 0
        for si in range(len(store.shards)):
            o = np.asarray(store.shard_arrays(si)[row_offsets_name(store)], np.int64)
            w.write(o[1:] + at)
            at += int(o[-1])
    finally:
        w.close()
    extra = [offsets_name]
    if store.per_token:
        w = _NpyWriter(out / "token_steps.npy", np.int32, (total,))
        try:
            for si in range(len(store.shards)):
                w.write(store.shard_arrays(si)["token_steps"])
        finally:
            w.close()
        extra.append("token_steps.npy")
        for key in ("token_positions", "token_ids"):   # each row's keys, where the run stores them
            if store.shards and key in store.shard_arrays(0):
                np.save(out / f"{key}.npy", np.concatenate([np.asarray(store.shard_arrays(si)[key], np.int32)
                                                            for si in range(len(store.shards))]))
                extra.append(f"{key}.npy")
    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        for si in range(len(store.shards)):
            for row in store.shard_meta(si):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"out": str(out), "files": files + extra + ["items.jsonl"], rows_key: total,
            "steps": sum(int(s["steps"]) for s in store.shards), "pooling": pooling}


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    if hasattr(p, "_negative_number_matcher"):   # `--layer -2` is a value
        import re
        p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$")
    p.add_argument("run", metavar="RUN", help="run directory of `rjepa-latent extract`")
    p.add_argument("--format", required=True, choices=["parquet", "npy"])
    p.add_argument("--out", required=True, help="a .parquet file, or a directory for npy")
    p.add_argument("--layer", default=None,
                   help="hidden-state index, or a site's name in a run of sites (parquet: one, "
                        "default the run's first; npy: comma-separated, default all)")
    p.add_argument("--row-group-rows", type=int, default=1024, help="parquet rows per row group")
    p.add_argument("--pooling", default=None,
                   help="which stored pooling to export (default the run's first)")
    p.add_argument("--partial", action="store_true",
                   help="export a run that is not complete (its finished shards only)")


def run(args: argparse.Namespace) -> int:
    from ..errors import StoreError
    try:
        store = open_latents(args.run)
        if not store.complete and not args.partial:
            raise ValueError(f"{args.run} is not complete ({len(store.shards)} shards finished); "
                             "finish it with `rjepa-latent extract` (the same command resumes), or "
                             "pass --partial to export the finished shards only")
        layers = None if args.layer is None else \
            [x.strip() if store.sites else int(x) for x in str(args.layer).split(",") if x.strip()]
        if args.format == "parquet" and store.sites:
            if layers and len(layers) > 1:
                raise ValueError("--format parquet takes one --layer (site)")
            site = stored_layer(store, layers[0] if layers else store.sites[0])
            res = export_parquet(store, args.out, site, args.row_group_rows, args.pooling)
            print(f"{res['out']}: {res['rows']} rows, {res['bytes']:,} bytes (site {site}, pooling "
                  f"{stored_pooling(store, args.pooling)})"
                  f"{'' if store.complete else '; partial run: finished shards only'}")
        elif args.format == "parquet":
            layer = layers[0] if layers else int(store.config["layers"][0])
            if layers and len(layers) > 1:
                raise ValueError("--format parquet takes one --layer")
            pooling = stored_pooling(store, args.pooling)
            res = export_parquet(store, args.out, layer, args.row_group_rows, pooling)
            shown = layer if layer >= 0 else layer + int(store.config["num_layers"]) + 1
            given = f" = --layer {layer}" if layer < 0 else ""   # the hidden-state index, as by default
            print(f"{res['out']}: {res['rows']} rows, {res['bytes']:,} bytes (layer {shown}{given}, "
                  f"pooling {pooling}){'' if store.complete else '; partial run: finished shards only'}")
        else:
            res = export_npy(store, args.out, layers, args.pooling)
            rows = f"{res['tokens']} tokens" if store.per_token else f"{res['steps']} steps"
            print(f"{res['out']}: {', '.join(res['files'])} ({rows}, pooling {res['pooling']})"
                  f"{'' if store.complete else '; partial run: finished shards only'}")
    except (StoreError, ValueError, TypeError, ImportError, OSError) as e:
        print(f"rjepa-latent export: error: {e}", file=sys.stderr)
        return 2
    return 0

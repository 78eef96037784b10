"""The token store: a per-token run turned into flat, globally shuffled
`[rows, width]` chunks per site, the form SAE and probe trainers read.

`build_token_store(run, out, ...)` (`rjepa-latent tokens RUN --out DIR`) and
`open_tokens(DIR)` (the reader; `rjepa_latent.torch.TokenBatches` streams it).

Layout of DIR (docs/tokens.md):
  manifest.json                     written last: sites, widths, dtype, rows, chunks, seed
  ids.json                          the run's item ids: ids[record]
  keys/chunk-CCCCC.safetensors      record, position, token_id (int32 [n] each) of chunk C
  <site>/chunk-CCCCC.safetensors    rows [n, width] of that site, same row order

Design choices:
- An external two-pass shuffle with bounded memory: pass 1 streams the run's
  rows (shard by shard, in blocks of at most a few MiB) and appends each row
  to one of B bucket files, the bucket drawn at random; pass 2 loads one
  bucket at a time, permutes it at random and appends it to the output
  chunks. A random bucket followed by a uniform permutation within it is a
  uniform permutation of all rows; memory is about two buckets plus one
  chunk, whatever the number of rows. B is chosen from `memory_bytes`.
- Every site and the keys go through the same draws (bucket of row g from
  the seed and its shard; the permutation of bucket b from the seed and b),
  so row k of every site's chunk and of the keys is the same token.
- Deterministic: the same run, seed, buckets and chunk size give the same
  bytes. The manifest is written last: a store without it (a killed build)
  never reads as complete, and building again starts it over.
- Rows are read with `pread`, never through a memory map, so the process's
  resident memory does not grow with the run's size.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import StoreError
from .files import STORE_DTYPES, _fsync_dir, _json_bytes, bf16_from_f32, f32_from_bf16, safetensors_chunks
from .token_rows import KEY_TENSORS

FORMAT = "rjepa-latent-tokens"
FORMAT_VERSION = 1
KEYS = "keys"
IDS = "ids.json"                  # the id of each record index (item of the run, in order)
KEY_COLUMNS = ("record", "position", "token_id")
DEFAULT_CHUNK_ROWS = 65536
DEFAULT_MEMORY = 1 << 30          # bytes the shuffle may hold (two buckets and a chunk)
_BLOCK_BYTES = 8 << 20            # rows read from the run at a time
_BUILD = ".build"                 # the buckets, removed when the store is done
_ST = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32}


def layer_site(layer: int) -> str:
    """The token store's name of a hidden-state layer index."""
    return f"layer-{layer}"


# ---------------------------------------------------------------- reading a run

def _header(path: Path) -> tuple[int, dict]:
    """(payload start, header) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


class _RunRows:
    """The per-token tensors of a run: for each site, where its rows lie in
    each shard, read block by block with pread."""

    def __init__(self, run: Path, sites: Sequence[str] | None, layers: Sequence[int] | None):
        from .read import open_latents
        self.store = open_latents(run)
        if not self.store.per_token:
            raise StoreError(f"{run} is not a per-token run (pooling {self.store.config['pooling']!r}); "
                             "the token store needs one: extract with --pooling none")
        if not self.store.complete:
            raise StoreError(f"{run} is not finished (no complete manifest); finish the extraction first")
        self.run = Path(run)
        self.shards = self.store.shards
        cfg_layers = list(self.store.config["layers"])
        first = self._tensors(0) if self.shards else {}
        avail: dict[str, tuple[str, int | None]] = {layer_site(L): ("latents", i) for i, L in enumerate(cfg_layers)}
        for name, info in first.items():   # any further per-token tensor: [rows, width] (a site)
            if name in ("latents",) + KEY_TENSORS or name.startswith(("step_", "token_")):
                continue
            shape = info["shape"]
            if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
                avail[name] = (name, None)
        want: list[str] = []
        if layers is not None:
            for L in layers:
                L = int(L) + (self.store.config["num_layers"] + 1 if int(L) < 0 else 0)
                if L not in cfg_layers:
                    raise StoreError(f"layer {L} is not in {run} (it stores layers {cfg_layers})")
                want.append(layer_site(L))
        if sites is not None:
            for s in sites:
                if s not in avail:
                    raise StoreError(f"site {s!r} is not in {run}; it stores {', '.join(avail)}")
                want.append(s)
        self.sites = list(dict.fromkeys(want)) if want else list(avail)
        self.avail = avail
        self.dtype = self.store.config["dtype"]

    def _tensors(self, si: int) -> dict:
        path = self.run / f"shard-{self.shards[si]['index']:05d}.safetensors"
        start, header = _header(path)
        return {k: {**v, "start": start, "path": path} for k, v in header.items() if k != "__metadata__"}

    def width(self, site: str) -> int:
        return int(self._tensors(0)[self.avail[site][0]]["shape"][-1]) if self.shards else 0

    def keys(self, si: int, item_base: int) -> np.ndarray:
        """int32 [rows, 3]: record (the item's position in open_latents(run)), position, token id."""
        arr = self.store.shard_arrays(si)
        if "token_ids" not in arr:
            raise StoreError(f"{self.run} was extracted without row keys (token positions and ids); "
                             "extract it again with this version of rjepa-latent")
        counts = np.diff(np.asarray(arr["token_offsets"]))
        rec = np.repeat(np.arange(item_base, item_base + len(counts), dtype=np.int32), counts)
        return np.stack([rec, np.asarray(arr["token_positions"]), np.asarray(arr["token_ids"])], axis=1)

    def blocks(self, site: str, si: int, out_dtype: str, block_bytes: int = _BLOCK_BYTES) -> Iterator[np.ndarray]:
        """The site's rows of shard si in order, in blocks, as `out_dtype` (stored form)."""
        name, layer = self.avail[site]
        t = self._tensors(si)[name]
        src = _ST[t["dtype"]]
        shape = t["shape"]
        rows, width = (shape[1], shape[2]) if len(shape) == 3 else (shape[0], shape[1])
        base = t["start"] + t["data_offsets"][0] + (layer or 0) * rows * width * np.dtype(src).itemsize
        row_bytes = width * np.dtype(src).itemsize
        step = max(1, block_bytes // max(row_bytes, 1))
        fd = os.open(t["path"], os.O_RDONLY)
        try:
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                buf = os.pread(fd, n * row_bytes, base + r0 * row_bytes)
                if len(buf) != n * row_bytes:
                    raise StoreError(f"{t['path']}: shorter than its header says (damaged)")
                yield _convert(np.frombuffer(buf, src).reshape(n, width), self.dtype, out_dtype)
        finally:
            os.close(fd)


def _convert(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return x
    f32 = f32_from_bf16(x) if src == "bfloat16" else x.astype(np.float32)
    if dst == "float32":
        return f32
    if dst == "bfloat16":
        return bf16_from_f32(f32)
    if np.abs(f32).max(initial=0.0) > 65504.0:
        raise StoreError("a row overflows float16 (|x| > 65504); use --dtype bfloat16 or float32")
    return f32.astype(np.float16)


# ---------------------------------------------------------------- the shuffle

def _write_file(path: Path, chunks: list) -> int:
    """Atomic: a temporary name, fsync, rename. Returns the size."""
    tmp = path.with_name(f".{path.name}.tmp")
    size = 0
    with open(tmp, "wb") as f:
        for c in chunks:
            b = c.reshape(-1).view(np.uint8) if isinstance(c, np.ndarray) else c
            f.write(b)
            size += len(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return size


class _Chunks:
    """Appends rows to fixed-size chunk files of one site (or the keys)."""

    def __init__(self, folder: Path, chunk_rows: int, width: int, dtype, st_dtype: str | None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.chunk_rows, self.st = folder, chunk_rows, st_dtype
        self.buf = np.empty((chunk_rows, width), dtype)
        self.fill = 0
        self.sizes: list[int] = []

    def add(self, rows: np.ndarray) -> None:
        at = 0
        while at < len(rows):
            n = min(len(rows) - at, self.chunk_rows - self.fill)
            self.buf[self.fill:self.fill + n] = rows[at:at + n]
            self.fill += n
            at += n
            if self.fill == self.chunk_rows:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        rows = self.buf[:self.fill]
        if self.st is None:   # the keys: one int32 tensor per column
            tensors = [(c, "I32", np.ascontiguousarray(rows[:, i])) for i, c in enumerate(KEY_COLUMNS)]
        else:
            tensors = [("rows", self.st, rows)]
        path = self.folder / f"chunk-{len(self.sizes):05d}.safetensors"
        self.sizes.append(_write_file(path, safetensors_chunks(tensors, {"rows": str(self.fill)})))
        self.fill = 0


def _enough_files(buckets: int) -> None:
    """Pass 1 keeps one file per bucket open: raise the soft limit when needed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = buckets + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise StoreError(f"the shuffle needs {buckets} open bucket files but the limit is {hard}; "
                             "give it more memory (--memory) so it needs fewer buckets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _bucket_of(seed: int, si: int, rows: int, buckets: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, si]).integers(0, buckets, rows, dtype=np.int64)


def _shuffle_one(rows_of, shard_rows: list[int], width: int, dtype, st_dtype: str | None,
                 folder: Path, tmp: Path, seed: int, buckets: int, chunk_rows: int) -> list[int]:
    """Both passes for one site (or the keys); returns the chunk sizes."""
    tmp.mkdir(parents=True, exist_ok=True)
    _enough_files(buckets)
    fds = [os.open(tmp / f"b{b:05d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for b in range(buckets)]
    counts = np.zeros(buckets, np.int64)
    try:
        for si, n in enumerate(shard_rows):   # pass 1: scatter to random buckets
            bucket = _bucket_of(seed, si, n, buckets)
            at = 0
            for block in rows_of(si):
                b = bucket[at:at + len(block)]
                at += len(block)
                order = np.argsort(b, kind="stable")
                sorted_rows = np.ascontiguousarray(block[order])
                edges = np.searchsorted(b[order], np.arange(buckets + 1))
                for k in np.flatnonzero(np.diff(edges)):
                    os.write(fds[k], sorted_rows[edges[k]:edges[k + 1]].reshape(-1).view(np.uint8))
                    counts[k] += edges[k + 1] - edges[k]
            if at != n:
                raise StoreError(f"shard {si}: read {at} rows, expected {n}")
    finally:
        for fd in fds:
            os.close(fd)
    out = _Chunks(folder, chunk_rows, width, dtype, st_dtype)
    for b in range(buckets):                  # pass 2: permute each bucket, append
        path = tmp / f"b{b:05d}"
        rows = np.fromfile(path, dtype=dtype).reshape(-1, width)
        if len(rows) != counts[b]:
            raise StoreError(f"bucket {b}: {len(rows)} rows on disk, {counts[b]} written")
        out.add(rows[np.random.default_rng([seed, 1, b]).permutation(len(rows))])
        del rows
        path.unlink()
    out.flush()
    shutil.rmtree(tmp, ignore_errors=True)
    return out.sizes


def build_token_store(run: str | os.PathLike, out: str | os.PathLike, *, sites: Sequence[str] | None = None,
                      layers: Sequence[int] | None = None, dtype: str | None = None, seed: int = 0,
                      chunk_rows: int | None = None, memory_bytes: int = DEFAULT_MEMORY) -> dict:
    """Shuffle the rows of the per-token run `run` into the token store `out`
    (every site unless `sites` / `layers` choose; `dtype` default the run's;
    `chunk_rows` default DEFAULT_CHUNK_ROWS, fewer when a chunk would take
    over a quarter of `memory_bytes`).
    A finished store of the same options is left as it is; one of other
    options is refused; an unfinished one (no manifest) is built again.
    Returns the manifest."""
    for name, v, low in (("seed", seed, 0), ("chunk_rows", 1 if chunk_rows is None else chunk_rows, 1),
                         ("memory_bytes", memory_bytes, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    src = _RunRows(Path(run), sites, layers)
    dtype = dtype or src.dtype
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    out = Path(out)
    shard_rows = [int(e["tokens"]) for e in src.shards]
    total = int(sum(shard_rows))
    widths = {s: src.width(s) for s in src.sites}
    st_dtype, np_dtype = STORE_DTYPES[dtype]
    row_bytes = max([w * np.dtype(np_dtype).itemsize for w in widths.values()] + [12])
    if chunk_rows is None:
        chunk_rows = max(1, min(DEFAULT_CHUNK_ROWS, memory_bytes // 4 // row_bytes))
    chunk_bytes = chunk_rows * row_bytes
    if chunk_bytes * 2 > memory_bytes:
        raise ValueError(f"chunk_rows={chunk_rows} of {row_bytes} bytes take {chunk_bytes:,} bytes; "
                         f"memory_bytes={memory_bytes:,} must hold two chunks: raise it or lower chunk_rows")
    # two buckets (one loaded, one permuted copy) and a chunk within the budget, 25% slack for chance
    bucket_bytes = (memory_bytes - chunk_bytes) / 2 / 1.25
    buckets = max(1, math.ceil(total * row_bytes / bucket_bytes))
    config = {"run_manifest_sha256": _sha(src.run / "manifest.json"), "sites": src.sites,
              "dtype": dtype, "seed": int(seed), "chunk_rows": int(chunk_rows), "buckets": buckets}
    if (out / "manifest.json").is_file():
        have = json.loads((out / "manifest.json").read_text())
        if have.get("config") == config:
            return have
        raise StoreError(f"{out} holds a token store made with other options ({have.get('config')}); "
                         "use another --out or delete it")
    if out.exists() and any(p.name not in (KEYS, _BUILD, IDS, *src.sites) and not p.name.startswith(".")
                            for p in out.iterdir()):
        raise StoreError(f"--out {out} holds other files; use an empty or new directory")
    for p in [out / _BUILD, out / KEYS, *(out / s for s in src.sites)]:   # a killed build: start over
        shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    item_base = np.concatenate([[0], np.cumsum([int(e["items"]) for e in src.shards])]).astype(int)
    key_sizes = _shuffle_one(lambda si: [src.keys(si, int(item_base[si]))], shard_rows, 3, np.int32, None,
                             out / KEYS, out / _BUILD, seed, buckets, chunk_rows)
    site_sizes = {}
    for s in src.sites:
        block = min(_BLOCK_BYTES, memory_bytes // 8)   # a block, its sorted copy, its conversion
        site_sizes[s] = _shuffle_one(lambda si, s=s: src.blocks(s, si, dtype, block), shard_rows, widths[s],
                                     np_dtype, st_dtype, out / s, out / _BUILD, seed, buckets, chunk_rows)
    n_chunks = len(key_sizes)
    ids = _write_file(out / IDS, [_json_bytes(list(src.store.ids), indent=None)])
    for folder in [out / KEYS, *(out / s for s in src.sites), out]:   # every rename durable first
        _fsync_dir(folder)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config,
                "run": {"model_fingerprint": src.store.config["model_fingerprint"],
                        "layers": src.store.config["layers"],
                        "token_selection": src.store.config.get("token_selection"),
                        "outliers": src.store.config.get("outliers"), "items": len(src.store)},
                "rows": total, "widths": widths, "chunks": n_chunks,
                "chunk_bytes": {KEYS: key_sizes, **site_sizes}, "ids_bytes": ids, "complete": True}
    _write_file(out / "manifest.json", [_json_bytes(manifest)])
    shutil.rmtree(out / _BUILD, ignore_errors=True)
    return manifest


def _sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- reading the store

class TokenStore:
    """A finished token store: `sites`, `widths`, `rows`, `chunks`, `dtype`;
    `chunk(site, c)` (the rows of chunk c: float32 / float16 arrays, bf16 as
    uint16 bits; `raw=False` widens bf16 to float32), `keys(c)` (record,
    position, token_id), `to_hf_dataset(site)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        m = self.path / "manifest.json"
        if not m.is_file():
            raise StoreError(f"{self.path} is not a finished token store (no manifest.json; a build "
                             "that was stopped leaves none): run `rjepa-latent tokens` again")
        self.manifest = json.loads(m.read_text())
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise StoreError(f"{self.path}/manifest.json is not a finished token store's manifest")
        self.config = self.manifest["config"]
        self.sites = list(self.config["sites"])
        self.widths = self.manifest["widths"]
        self.rows = int(self.manifest["rows"])
        self.chunks = int(self.manifest["chunks"])
        self.dtype = self.config["dtype"]

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, {self.rows} rows, sites {self.sites}, {self.dtype})"

    def _site(self, site: str) -> str:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in this token store; it holds {', '.join(self.sites)}")
        return site

    def _read(self, folder: str, c: int) -> dict[str, np.ndarray]:
        if not 0 <= c < self.chunks:
            raise IndexError(f"chunk {c} out of range for {self.chunks} chunks")
        path = self.path / folder / f"chunk-{c:05d}.safetensors"
        want = self.manifest["chunk_bytes"][folder][c]
        # one read into a fresh, writable array; the tensors are views of it
        data = np.fromfile(path, np.uint8) if path.is_file() else np.zeros(0, np.uint8)
        if len(data) != want:
            raise StoreError(f"{path}: {len(data)} bytes, the manifest says {want}; the store is "
                             "damaged: build it again")
        n = int(data[:8].view("<u8")[0])
        header = json.loads(data[8:8 + n].tobytes())
        out = {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            out[k] = data[8 + n + a:8 + n + b].view(_ST[v["dtype"]]).reshape(v["shape"])
        return out

    def chunk(self, site: str, c: int, raw: bool = True) -> np.ndarray:
        rows = self._read(self._site(site), c)["rows"]
        return rows if raw or self.dtype != "bfloat16" else f32_from_bf16(rows)

    def keys(self, c: int) -> dict[str, np.ndarray]:
        return self._read(KEYS, c)

    @property
    def ids(self) -> list[str]:
        """The run's item ids: `ids[record]` is the id of a row's record."""
        path = self.path / IDS
        data = path.read_bytes() if path.is_file() else b""
        if len(data) != self.manifest["ids_bytes"]:
            raise StoreError(f"{path}: not the size the manifest says; the store is damaged: build it again")
        return json.loads(data)

    def read_rows_into(self, site: str, c: int, out: np.ndarray) -> int:
        """Read chunk c's rows of `site` straight into `out` (at least the chunk's
        rows, stored dtype: bf16 as uint16); returns the number of rows."""
        if not 0 <= c < self.chunks:
            raise IndexError(f"chunk {c} out of range for {self.chunks} chunks")
        path = self.path / self._site(site) / f"chunk-{c:05d}.safetensors"
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self.manifest["chunk_bytes"][site][c]:
                raise StoreError(f"{path}: not the size the manifest says; the store is damaged: build it again")
            n = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(n))["rows"]
            rows = int(info["shape"][0])
            a, b = info["data_offsets"]
            f.seek(8 + n + a)
            if f.readinto(memoryview(out[:rows]).cast("B")) != b - a:
                raise StoreError(f"{path}: shorter than its header says; the store is damaged")
        return rows

    def to_hf_dataset(self, site: str | None = None):
        """A `datasets.Dataset` of flat rows: record, position, token_id and `x`
        (the row, float32) of `site` (default the first), in store order."""
        import datasets
        import pyarrow as pa
        site = self._site(site or self.sites[0])
        tables = []
        for c in range(self.chunks):
            k = self.keys(c)
            x = np.ascontiguousarray(self.chunk(site, c, raw=False), dtype=np.float32)
            col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
            tables.append(pa.table({**{n: pa.array(k[n]) for n in KEY_COLUMNS}, "x": col}))
        table = pa.concat_tables(tables) if tables else pa.table({n: pa.array([], pa.int32()) for n in KEY_COLUMNS})
        return datasets.Dataset(table)


def open_tokens(path: str | os.PathLike) -> TokenStore:
    """The token store at `path` (StoreError when it is not a finished one)."""
    return TokenStore(path)


# ---------------------------------------------------------------- rjepa-latent tokens

def _layer_list(text: str) -> list[int]:
    import argparse
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers (e.g. 12,-2), "
                                         f"got {text!r}") from None


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="a finished per-token run directory (--pooling none)")
    p.add_argument("--out", required=True, help="the token store's directory (created)")
    p.add_argument("--sites", default=None, help="comma-separated sites to store (default every one)")
    p.add_argument("--layers", default=None, type=_layer_list,
                   help="comma-separated hidden-state layers to store (their sites are layer-N)")
    p.add_argument("--dtype", default=None, choices=list(STORE_DTYPES), help="stored dtype (default the run's)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle's seed (default 0)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help=f"rows per chunk file (default {DEFAULT_CHUNK_ROWS}, or what a quarter of --memory holds)")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY >> 20, metavar="MIB",
                   help=f"memory the shuffle may hold, MiB (default {DEFAULT_MEMORY >> 20})")


def run(args) -> int:
    import sys
    try:
        layers = args.layers
        sites = None if args.sites is None else [s.strip() for s in args.sites.split(",") if s.strip()]
        m = build_token_store(args.run, args.out, sites=sites, layers=layers, dtype=args.dtype,
                              seed=args.seed, chunk_rows=args.chunk_rows, memory_bytes=args.memory << 20)
    except (StoreError, ValueError, OSError) as e:
        print(f"rjepa-latent tokens: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {m['rows']:,} rows x {', '.join(f'{s} ({w})' for s, w in m['widths'].items())} "
          f"in {m['chunks']} chunks of {m['config']['chunk_rows']} rows, {m['config']['dtype']}, "
          f"seed {m['config']['seed']} ({m['config']['buckets']} buckets)")
    return 0

"""Reading a run directory: `open_latents` -> `LatentStore` (items by position or
id, mapped shard by shard), and a run as an Arrow table or an HF Dataset."""
from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..engine.model import TOKEN_POOLING
from ..errors import StoreError
from .token_rows import KEY_TENSORS, OUTLIER_TENSOR
from .integrity import check_mapped_payload, reader_check
from .files import (MAX_OPEN_SHARDS, _parse_safetensors, _read_sidecar, _verify, check_shard_arrays,
                    damage_report, latents_tensor, read_manifests, run_poolings, run_sites, site_tensor,
                    site_width, token_steps_of)
from .index import MAX_CACHED_SIDECARS, IdIndex, IdList, SidecarLines, check_sidecar


class LatentItem:
    """One stored item: `id`, `latents` [n_layers, n_steps, hidden] of the run's
    first pooling (per-token runs: [n_layers, n_tokens, hidden]), `pooled(name)`
    for any stored pooling, `token_spans` [n_steps, 2], `token_steps`
    [n_tokens], `meta` (its shard-jsonl line). A run of activation sites has
    no `latents`: `site(name)` [n_steps, width] (per token: [n_tokens, width])."""

    def __init__(self, raws: dict[str, np.ndarray], token_spans: np.ndarray, meta: dict, bf16: bool,
                 token_steps: np.ndarray | None = None,
                 sites: dict[str, dict[str, np.ndarray]] | None = None,
                 num_layers: int | None = None):
        self._raws = raws                       # pooling -> zero-copy view, in run order
        self._sites = sites or {}               # site -> pooling -> zero-copy view
        self._num_layers = num_layers
        self.poolings = list(raws) or list(next(iter(self._sites.values()), {}))
        self.raw_latents = raws.get(self.poolings[0]) if self.poolings else None
        self.token_spans = token_spans
        self.meta = meta
        self._bf16 = bf16
        self._token_steps = token_steps

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def per_token(self) -> bool:
        """True for an item of a per-token run (pooling "none": a row per token)."""
        return self.poolings == [TOKEN_POOLING]

    def _view(self, raw: np.ndarray) -> np.ndarray:
        if self._bf16:
            import ml_dtypes
            return raw.view(ml_dtypes.bfloat16)
        return raw

    @property
    def latents(self) -> np.ndarray:
        """Zero-copy view of the run's first pooling: float32 / float16, or
        `ml_dtypes.bfloat16` for bfloat16 stores (NumPy has no bfloat16 of its
        own; `.astype(np.float32)` widens)."""
        return self._view(self.raw_latents)

    def raw_pooled(self, pooling: str) -> np.ndarray:
        """Zero-copy stored view of one pooling (bfloat16: uint16 bits)."""
        if pooling not in self._raws:
            raise KeyError(f"pooling {pooling!r} is not in this run; it stores "
                           f"{', '.join(map(repr, self.poolings))}")
        return self._raws[pooling]

    def pooled(self, pooling: str) -> np.ndarray:
        """[n_layers, n_steps, hidden] of one stored pooling (zero-copy, as `latents`)."""
        return self._view(self.raw_pooled(pooling))

    @property
    def sites(self) -> list[str]:
        """The activation sites stored (canonical names; empty for a run of layers)."""
        return list(self._sites)

    def raw_site(self, name: str, pooling: str | None = None) -> np.ndarray:
        """Zero-copy stored view of one site (bfloat16: uint16 bits)."""
        key = name
        if name not in self._sites and self._num_layers is not None:
            from ..engine.sites import canonical
            key = canonical(name, self._num_layers)   # blocks.-1... or a malformed name's error
        if key not in self._sites:
            raise KeyError(f"site {name!r} is not in this run; it stores "
                           f"{', '.join(self._sites) or 'no sites (a run of layers)'}")
        by_pool = self._sites[key]
        if pooling is None:
            pooling = self.poolings[0]
        if pooling not in by_pool:
            raise KeyError(f"pooling {pooling!r} is not in this run; it stores "
                           f"{', '.join(map(repr, self.poolings))}")
        return by_pool[pooling]

    def site(self, name: str, pooling: str | None = None) -> np.ndarray:
        """[n_steps, width] of a stored site (per token: [n_tokens, width]) under
        `pooling` (default the run's first); `name` canonical or with a negative
        block; zero-copy, as `latents`."""
        return self._view(self.raw_site(name, pooling))

    @property
    def token_steps(self) -> np.ndarray:
        """int32 [num_tokens]: each token position's step index, -1 outside every
        step (a zero-copy view in per-token runs; derived from token_spans otherwise)."""
        if self._token_steps is None:
            self._token_steps = token_steps_of(self.token_spans, int(self.meta["num_tokens"]))
        return self._token_steps

    # per-token runs with row keys (docs/tokens.md): each row's position in the
    # text, token id, norm per layer [n_layers, rows], outlier marks (0/1)
    token_keys: dict = {}

    def token_key(self, name: str) -> np.ndarray:
        """A per-token row key: "token_positions", "token_ids", "token_norms" or
        "token_outliers" (zero-copy views); KeyError when the run has none."""
        if name not in self.token_keys:
            raise KeyError(f"this item stores no {name!r} (it has {sorted(self.token_keys) or 'no row keys'}: "
                           "per-token runs store them; outliers only with --outliers)")
        return self.token_keys[name]

    def __repr__(self) -> str:
        if self.raw_latents is None:
            return f"LatentItem(id={self.id!r}, sites={self.sites}, poolings={self.poolings})"
        return (f"LatentItem(id={self.id!r}, latents={tuple(self.raw_latents.shape)}, "
                f"poolings={self.poolings})")


class LatentStore:
    """Read side of a run directory; see `open_latents`."""

    def __init__(self, path: str | Path, writable: bool = False, verify: bool = False,
                 progress: bool = True):
        self.path = Path(path)
        self.writable = writable
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a directory")
        manifests = read_manifests(self.path)
        if not manifests:
            raise StoreError(f"{self.path} has no manifest.json: not an rjepa-latent run directory "
                             "(or no shard finished yet)")
        first = next(iter(manifests.values()))
        self.config = first["config"]
        self.num_records = first["num_records"]
        shards: dict[int, dict] = {}
        for m in manifests.values():
            if m["config"] != self.config:
                raise StoreError(f"{self.path}: manifests disagree on the configuration")
            for s in m["shards"]:
                shards.setdefault(s["index"], s)
        self.shards = [shards[k] for k in sorted(shards)]
        if verify:
            bad = _verify(self.path, manifests, True, progress)
            if bad:
                raise StoreError(f"{self.path}: {len(bad)} damaged or missing file(s):\n"
                                 + damage_report(self.path, bad) + "\nrun the extract command "
                                 "again with --repair to redo the damaged shards")
        self.complete = len(self.shards) == first["num_shards"]
        self.errors = [e for s in self.shards for e in s["errors"]]
        self.dtype = self.config["dtype"]
        self.poolings = run_poolings(self.config)      # in order; the first is `.latents`
        self.sites = run_sites(self.config)            # activation sites (canonical names)
        self.per_token = self.poolings == [TOKEN_POOLING]
        # memory flat in the number of records: per shard only its item count is
        # kept; metadata rows are read when a shard is used (a few recent ones cached)
        for s in self.shards:   # every sidecar's size, sha256 and line count, streamed
            check_sidecar(self.path / f"shard-{s['index']:05d}.jsonl", s)
        self._starts = np.concatenate([[0], np.cumsum([int(s["items"]) for s in self.shards],
                                                      dtype=np.int64)]).astype(np.int64)
        self._rows: OrderedDict[int, list[dict]] = OrderedDict()
        self._lines = SidecarLines()
        self._index: IdIndex | None = None   # built on the first lookup by id
        self.ids = IdList(self)
        # each open shard holds an mmap and so a file descriptor: keep only the
        # most recently used ones (a shard's mmap lives on while views of it do)
        self._arrays: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shard_meta(self, si: int) -> list[dict]:
        """Metadata rows of the si-th stored shard (in shard order), read from its
        sidecar (checked against the manifest) when first needed."""
        if si in self._rows:
            self._rows.move_to_end(si)
            return self._rows[si]
        s = self.shards[si]
        jsonl = self.path / f"shard-{s['index']:05d}.jsonl"
        rows = _read_sidecar(jsonl, s["files"].get(jsonl.name, {}))
        if len(rows) != s["items"]:
            raise StoreError(f"{jsonl}: {len(rows)} lines, the manifest says {s['items']}")
        self._rows[si] = rows
        if len(self._rows) > MAX_CACHED_SIDECARS:
            self._rows.popitem(last=False)
        return rows

    def row(self, si: int, j: int) -> dict:
        """Metadata row j of the si-th stored shard (one line read when the
        shard's rows are not cached)."""
        rows = self._rows.get(si)
        return rows[j] if rows is not None else self._lines.row(self, si, j)

    def locate(self, pos: int) -> tuple[int, int]:
        """(stored shard, row in it) of item position `pos` (0 <= pos < len)."""
        si = int(np.searchsorted(self._starts, pos, side="right")) - 1
        return si, int(pos - self._starts[si])

    def position_of(self, item_id: str) -> int | None:
        """The position of the item with this id (the last one if an id repeats),
        or None; the first call builds the id index (one pass over the sidecars)."""
        if self._index is None:
            self._index = IdIndex.build(self)
        return self._index.find(self, item_id)

    def to_hf_dataset(self, layer: int = -2, pooling: str | None = None, cache_dir=None):
        """A `datasets.Dataset`: id, latents [num_steps, hidden] of `layer` (or of
        an activation site: its name) and `pooling` (default the run's first;
        per-token runs: [num_tokens, hidden]
        and token_steps), num_steps, num_tokens, carried metadata
        (rjepa_latent.readers); memory-mapped from an Arrow file in `cache_dir`
        (default: the `datasets` cache), see `to_hf_dataset`."""
        return to_hf_dataset(self, layer, pooling, cache_dir)

    def shard_arrays(self, si: int) -> dict[str, np.ndarray]:
        """step_offsets, token_spans, latents (and latents.<pooling> of each further
        pooling; per-token runs: token_offsets, token_steps) of the si-th stored
        shard (views of its mmap)."""
        if si in self._arrays:
            self._arrays.move_to_end(si)
            return self._arrays[si]
        entry = self.shards[si]
        path = self.path / f"shard-{entry['index']:05d}.safetensors"
        info = entry["files"].get(path.name, {})
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != info.get("bytes"):
                    raise StoreError(f"{path}: {size} bytes, the manifest says {info.get('bytes')}; the "
                                     "file is damaged: `rjepa-latent extract ... --repair` redoes it")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if self.writable else mmap.ACCESS_READ)
                identity = os.fstat(f.fileno())   # of the file mapped: its payload check's key
        except OSError as e:
            raise StoreError(f"{path}: cannot open the shard ({e.strerror}); it is listed in the "
                             "manifest: `rjepa-latent extract ... --repair` redoes it") from None
        arrays, meta = _parse_safetensors(path, mm, size)
        check_shard_arrays(path, arrays, meta, self.config, entry)
        check_mapped_payload(path, identity, mm, info, getattr(self, "check", None))
        self._arrays[si] = arrays
        if len(self._arrays) > MAX_OPEN_SHARDS:
            self._arrays.popitem(last=False)
        return arrays

    def __getitem__(self, key: int | str) -> LatentItem:
        if isinstance(key, str):
            pos = self.position_of(key)
            if pos is None:
                raise KeyError(f"no item with id {key!r}")
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            pos = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= pos < len(self):
                raise IndexError(f"item index {key} out of range for {len(self)} items")
        else:
            raise TypeError(f"index by position (int) or id (str), not {type(key).__name__}")
        si, j = self.locate(pos)
        return self._item(si, j, self.row(si, j))

    def _item(self, si: int, j: int, meta: dict) -> LatentItem:
        arr = self.shard_arrays(si)
        a, b = int(arr["step_offsets"][j]), int(arr["step_offsets"][j + 1])
        ra, rb, token_steps = a, b, None
        if self.per_token:
            ra, rb = int(arr["token_offsets"][j]), int(arr["token_offsets"][j + 1])
            token_steps = arr["token_steps"][ra:rb]
        raws = {} if self.sites else \
            {p: arr[latents_tensor(self.poolings, p)][:, ra:rb, :] for p in self.poolings}
        sites = {s: {p: arr[site_tensor(self.poolings, p, s)][ra:rb] for p in self.poolings}
                 for s in self.sites}
        item = LatentItem(raws, arr["token_spans"][a:b], meta, self.dtype == "bfloat16",
                          token_steps, sites, self.config.get("num_layers"))
        if self.per_token:
            item.token_keys = {k: arr[k][..., ra:rb] for k in KEY_TENSORS + (OUTLIER_TENSOR,) if k in arr}
        return item

    def __iter__(self) -> Iterator[LatentItem]:
        for si in range(len(self.shards)):
            for j, meta in enumerate(self.shard_meta(si)):
                yield self._item(si, j, meta)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"LatentStore({str(self.path)!r}, {len(self)} items, {len(self.errors)} errors, {state})"


def open_latents(path: str | Path, writable: bool = False, verify: bool = False,
                 progress: bool = True, check: str | None = None) -> LatentStore:
    """Open a run directory (complete or partial: finished shards only) for
    reading; `writable` maps shards copy-on-write: arrays may be written in
    memory, privately to this process (the files never change), and such a
    write is seen by later accesses of the same shard while it stays mapped.
    Every shard's header and payload sha256 are checked against the manifest
    the first time this process maps it (`check="header"`, or the environment
    variable RJEPA_TRUST_SHARDS=1, skips the payload hash for a run verified
    already), every sidecar's sha256 on open;
    `verify` also hashes every payload first (a full read) and raises
    StoreError listing each damaged or missing file (`progress`: its progress
    line on large runs, stderr)."""
    mode = reader_check(check)
    store = LatentStore(path, writable, verify, progress)
    store.check = mode   # what a shard's first mapping checks (rjepa_latent.store.integrity)
    return store


_INSTALL = {"pyarrow": "pip install 'pyarrow>=14'",
            "datasets": "pip install 'datasets>=2.16' 'pyarrow>=14'  (HF datasets)"}


FIXED_COLUMNS = ("id", "num_steps", "num_tokens")


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"this needs {module}: {_INSTALL.get(module, 'pip install ' + module)}") from None


def stored_layer(store: LatentStore, layer: int | str) -> int | str:
    """Position in the run's stored layers of hidden-state index `layer`
    (negatives count from the end, as everywhere: -1 = the final norm); for
    an activation site's name (a str), its canonical name in the run."""
    n = int(store.config["num_layers"])
    if isinstance(layer, str):
        from ..engine.sites import canonical
        name = canonical(layer, n)
        if name not in store.sites:
            raise ValueError(f"site {layer!r} is not in this run; it stores "
                             f"{', '.join(store.sites) or 'layers ' + str(store.config['layers'])}")
        return name
    if store.sites:
        raise ValueError(f"this run stores activation sites, not layers: name one of "
                         f"{', '.join(store.sites)}")
    from ..checkpoints.checkpoint import hidden_state_index
    stored = [int(x) for x in store.config["layers"]]
    absolute = hidden_state_index(layer, n, "layer")
    if absolute not in stored:
        shown = f"layer {layer}" if absolute == layer else f"layer {layer} (= {absolute})"
        raise ValueError(f"{shown} is not in this run; it stores layers {stored} (of 0..{n})")
    return stored.index(absolute)


def stored_pooling(store: LatentStore, pooling: str | None) -> str:
    """The stored pooling `pooling` names (None: the run's first), else ValueError
    naming what the run stores."""
    if pooling is None:
        return store.poolings[0]
    if not isinstance(pooling, str) or pooling not in store.poolings:
        raise ValueError(f"pooling {pooling!r} is not in this run; it stores "
                         f"{', '.join(map(repr, store.poolings))}")
    return pooling


def row_offsets_name(store: LatentStore) -> str:
    """The shard tensor of per-item row offsets: steps, or tokens in a per-token run."""
    return "token_offsets" if store.per_token else "step_offsets"


def shards(store: LatentStore, pos: int, pooling: str | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray, list[dict]]]:
    """Per shard: (latents [total_rows, hidden] of stored layer `pos` and
    `pooling` (default the run's first), row offsets int64 [items + 1], metadata
    rows). Rows are steps, or tokens in a per-token run."""
    pooling = stored_pooling(store, pooling)
    name = site_tensor(store.poolings, pooling, pos) if isinstance(pos, str) else \
        latents_tensor(store.poolings, pooling)
    for si in range(len(store.shards)):
        arrays = store.shard_arrays(si)
        yield (arrays[name] if isinstance(pos, str) else arrays[name][pos],
               np.asarray(arrays[row_offsets_name(store)], np.int64),
               store.shard_meta(si))


def output_width(store: LatentStore, pos: int | str) -> int:
    """Floats per row of a stored layer position (the hidden size) or site."""
    return site_width(store.config, pos) if isinstance(pos, str) else int(store.config["hidden_size"])


def bf16_view(values: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> the same memory as ml_dtypes.bfloat16."""
    ml = _need("ml_dtypes")
    return values.view(ml.bfloat16)


def _metadata_types(store: LatentStore, pa, as_json: set[str]) -> dict[str, Any]:
    """Every carried metadata field (in order of first appearance) and its Arrow
    type over the whole run, one shard's rows at a time: the type Arrow infers,
    widened across shards; None (JSON text) where values of a field mix types
    Arrow cannot hold in one column, or for the fields in `as_json`."""
    types: dict[str, Any] = {}
    for si in range(len(store.shards)):
        rows = store.shard_meta(si)
        names = list(types)
        for r in rows:
            names.extend(k for k in r if k not in FIXED_COLUMNS and k not in types and k not in names)
        for k in names:
            if k not in types:
                types[k] = pa.null()
            if k in as_json or types[k] is None:
                types[k] = None
                continue
            try:
                t = pa.array([r.get(k) for r in rows]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):   # mixed types: keep them as JSON text
                types[k] = None
                continue
            if t != types[k] and t != pa.null():
                try:
                    types[k] = t if types[k] == pa.null() else pa.unify_schemas(
                        [pa.schema([(k, types[k])]), pa.schema([(k, t)])],
                        promote_options="permissive").field(k).type
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    types[k] = None
    return types


class MixedColumn(Exception):
    """A metadata field whose values do not convert to the type found for it."""


def _metadata_arrays(rows: list[dict], types: dict[str, Any], pa) -> list:
    out = []
    for k, t in types.items():
        values = [r.get(k) for r in rows]
        if t is None:
            out.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                                pa.string()))
            continue
        try:
            out.append(pa.array(values, type=t))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
            raise MixedColumn(k) from None
    return out


def arrow_parts(store: LatentStore, layer: int = -2, pooling: str | None = None,
                as_json: frozenset = frozenset()):
    """(schema, a generator of one pyarrow Table per shard) of `arrow_table`, for
    building or writing it a shard at a time (memory flat in the run's size).
    The schema holds every metadata field of the run (one pass over the
    sidecars first); fields in `as_json` are JSON text. The generator raises
    `MixedColumn(field)` for a field whose values do not fit the type found for
    it: start again with that field in `as_json` (`with_json_fallback`)."""
    pa = _need("pyarrow")
    pos = stored_layer(store, layer)
    pooling = stored_pooling(store, pooling)
    types = _metadata_types(store, pa, set(as_json))
    schema = _schema(store, pos, pooling, types, pa)
    return schema, (_shard_table(store, si, pos, pooling, types, schema, pa)
                    for si in range(len(store.shards)))


def with_json_fallback(build):
    """build(as_json) again with each field that raised MixedColumn as JSON text."""
    as_json: set[str] = set()
    while True:
        try:
            return build(frozenset(as_json))
        except MixedColumn as e:
            if e.args[0] in as_json:
                raise
            as_json.add(e.args[0])


def _token_columns(store: LatentStore) -> list[str]:
    """The per-token key columns of the export: each row's step, and its
    position and token id in runs that store them (every shard alike)."""
    stored = store.shard_arrays(0) if store.shards else {}
    return ["token_steps"] + [k for k in ("token_positions", "token_ids") if k in stored]


def _schema(store: LatentStore, pos: int | str, pooling: str, types: dict[str, Any], pa):
    hidden = output_width(store, pos)
    bf16 = store.config["dtype"] == "bfloat16"
    value_type = pa.uint16() if bf16 else pa.float16() if store.config["dtype"] == "float16" else pa.float32()
    fields = [pa.field("id", pa.string()),
              pa.field("latents", pa.list_(pa.list_(value_type, hidden)),
                       metadata={"dtype": "bfloat16"} if bf16 else None)]
    if store.per_token:
        fields += [pa.field(k, pa.list_(pa.int32())) for k in _token_columns(store)]
    fields += [pa.field("num_steps", pa.int64()), pa.field("num_tokens", pa.int64())]
    fields += [pa.field(k, pa.string() if t is None else t) for k, t in types.items()]
    where = {"site": pos} if isinstance(pos, str) else {"layer": int(store.config["layers"][pos])}
    meta = {"rjepa_latent": json.dumps({**where,
                                        "pooling": pooling,
                                        "rows": "tokens" if store.per_token else "steps",
                                        "dtype": store.config["dtype"],
                                        "model_fingerprint": store.config.get("model_fingerprint")})}
    return pa.schema(fields, metadata=meta)


def _shard_table(store: LatentStore, si: int, pos: int | str, pooling: str, types: dict[str, Any],
                 schema, pa):
    hidden = output_width(store, pos)
    arrays = store.shard_arrays(si)
    lat = arrays[site_tensor(store.poolings, pooling, pos)] if isinstance(pos, str) else \
        arrays[latents_tensor(store.poolings, pooling)][pos]
    offsets = pa.array(np.asarray(arrays[row_offsets_name(store)], np.int64).astype(np.int32))
    rows = store.shard_meta(si)
    flat = np.ascontiguousarray(lat).reshape(-1)
    values = pa.array(flat) if flat.dtype != np.float16 else pa.array(flat, type=pa.float16())
    cols = [pa.array([r["id"] for r in rows], pa.string()),
            pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(values, hidden))]
    if store.per_token:   # each row's step, and its position and token id where stored
        cols += [pa.ListArray.from_arrays(offsets, pa.array(np.asarray(arrays[k], np.int32)))
                 for k in _token_columns(store)]
    cols += [pa.array([r["num_steps"] for r in rows], pa.int64()),
             pa.array([r["num_tokens"] for r in rows], pa.int64()),
             *_metadata_arrays(rows, types, pa)]
    return pa.Table.from_arrays(cols, schema=schema)


def arrow_table(store: LatentStore, layer: int = -2, pooling: str | None = None):
    """The run as one pyarrow Table (layout in the module docstring) of one layer
    (or activation site, by name) and one pooling (default the run's first)."""
    pa = _need("pyarrow")

    def build(as_json):
        schema, tables = arrow_parts(store, layer, pooling, as_json)
        parts = list(tables)
        return pa.concat_tables(parts) if parts else schema.empty_table()
    return with_json_fallback(build)


HF_BATCH_BYTES = 4 << 20   # bytes of one record batch in to_hf_dataset's Arrow file


def to_hf_dataset(store: LatentStore, layer: int = -2, pooling: str | None = None,
                  cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` of the run (columns as in arrow_table), memory-mapped
    from an Arrow file written a shard at a time (memory flat in the run's
    size) into `cache_dir` (default: the `datasets` cache, its rjepa_latent
    folder); the file is named by the run, its shards' hashes, the layer and the
    pooling, so the same call again maps it without writing."""
    ds = _need("datasets")
    pa = _need("pyarrow")
    import hashlib
    key = json.dumps([str(store.path.resolve()), store.config.get("model_fingerprint"),
                      [s["files"] for s in store.shards], stored_layer(store, layer),
                      stored_pooling(store, pooling)], sort_keys=True)
    root = Path(cache_dir) if cache_dir is not None else Path(ds.config.HF_DATASETS_CACHE) / "rjepa_latent"
    path = root / f"run-{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

        def write(as_json) -> None:
            # record batches of HF_BATCH_BYTES: `datasets` reads every batch's
            # header when it maps the file, and each touches the pages around it
            schema, tables = arrow_parts(store, layer, pooling, as_json)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
                pending: list = []
                for t in tables:
                    pending.append(t)
                    if sum(x.nbytes for x in pending) >= HF_BATCH_BYTES:
                        w.write_table(pa.concat_tables(pending).combine_chunks())
                        pending = []
                if pending:
                    w.write_table(pa.concat_tables(pending).combine_chunks())
        try:
            with_json_fallback(write)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return ds.Dataset.from_file(str(path))

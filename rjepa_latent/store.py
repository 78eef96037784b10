"""The run directory: latent shards, per-item metadata, manifest, errors; atomic,
resumable, shared by `--part` workers; and `open_latents`, its zero-copy reader.

Layout (the output-store contract of docs/design.md; details in docs/formats.md):
  manifest.json                      config, shard list with counts + sha256, complete flag
  manifest.part-IIIII-of-NNNNN.json  one per `--part` worker (n > 1) while it works
  shard-KKKKK.safetensors            step_offsets, token_spans, latents [n_layers, n_steps, hidden]
                                     of the first pooling, latents.<pooling> of each further one;
                                     per-token runs (pooling "none"): token_offsets, token_steps,
                                     latents [n_layers, n_tokens, hidden]
  shard-KKKKK.jsonl                  one line per item, same order
  errors.jsonl                       records that could not be processed (derived from the manifest)

Design choices:
- Shard k holds the good records among input records [k*S, (k+1)*S): its
  content depends only on the input bytes and the configuration, never on
  batching, timing or which worker made it, so a resumed run, a `--part`
  run and an uninterrupted run produce the same bytes.
- Every file is written to a hidden temporary name, fsynced, renamed, and
  the directory fsynced; the manifest (which lists shard files with sizes and
  sha256) is written after the shard's files, so whatever is listed is
  complete. Files not listed are recomputed on resume. Nothing run-dependent
  (times, host names, paths) goes into any file.
- A record's errors live in its shard's manifest entry, so errors.jsonl is
  a pure function of the manifests and can be rewritten at any time.
- Safetensors files are written by hand (header JSON + raw little-endian
  payload) so bfloat16 needs no framework and bytes are fully under control.
  The reader parses the header itself and returns np.frombuffer views over
  an mmap of the file: zero-copy for float32 and float16. NumPy has no
  bfloat16, so bf16 stores give `ml_dtypes.bfloat16` views of the same
  memory via `.latents` and the raw uint16 view via `.raw_latents`.
- The configuration a resume must match includes the engine identity
  (`ENGINE_IDENTITY`: backend, compute dtype, kernel, package version), which
  decides the result bits as much as the model does. A run directory made
  before these fields existed is refused with that reason. With
  `allow_kernel_change` only the kernel may differ; the manifest keeps the
  run's first configuration and every shard entry names the kernel that
  computed it.
- Several poolings are stored as one tensor each, `latents` (the first, the
  one `.latents` returns, so readers of one pooling are unchanged) and
  `latents.<name>` (the others); the header's __metadata__ "poolings" and the
  configuration's `pooling` (a name, or a list of names) say which. A
  per-token run ("none") stores every token's row and each token's step.
- Integrity (nothing damaged is served): every open of a shard checks its
  size, its header against the manifest entry (dtypes, shapes, offsets, the
  counts of items, steps, tokens and poolings) and the sha256 of its sidecar
  (.jsonl, small); the payload sha256 is streamed only on request
  (`verify_run`, `open_latents(verify=True)`, `rjepa-latent verify`,
  `extract --repair`), since it costs a full read of the run. Every problem
  is a StoreError naming the file. Sidecars are strict JSON: a non-finite
  float in a carried field is written as null and its name listed in the
  row's `nonfinite_fields`.
- Test hook: RJEPA_TEST_KILL_AT=k SIGKILLs the process at the k-th write
  step (mid-write, after fsync, after rename, after the directory fsync), so
  tests can kill deterministically at many distinct instants.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import StoreError
from .model import TOKEN_POOLING

FORMAT = "rjepa-latent"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)   # format 1 runs are read (not resumed)
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
# dtypes latents are stored in (config "dtype"); not the engine's compute dtypes (model.ENGINE_DTYPES)
STORE_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16),
                "bfloat16": ("BF16", np.uint16)}
# configuration fields naming the engine that computed the bytes
ENGINE_IDENTITY = ("engine_backend", "engine_dtype", "engine_kernel", "package_version")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
_PART_MANIFEST = re.compile(r"^manifest\.part-(\d{5})-of-(\d{5})\.json$")
_JOURNAL = re.compile(r"^shard-(\d{5,})\.json$")
# a temporary: .<final name>.tmp-<tag> (`write_tag`: host, pid, what it writes)
_TMP = re.compile(r"^\.(?:shard-(\d{5,})\.)?.+\.tmp-[A-Za-z0-9._-]+$")
_OWN_FILE = re.compile(r"^(manifest(\.part-\d{5}-of-\d{5})?\.json|shard-\d{5,}\.(safetensors|jsonl|json)"
                       r"|errors\.jsonl|\..+\.tmp-[A-Za-z0-9._-]+)$")
_MAX_HEADER = 100 * 1024 * 1024
MAX_OPEN_SHARDS = 16  # shards a reader keeps mapped (one file descriptor each)
VERIFY_PROGRESS_BYTES = 256 * 1024 * 1024  # a full verify of more shows a progress line

# ------------------------------------------------------------ atomic writes

_kill_at = int(os.environ.get("RJEPA_TEST_KILL_AT", "0") or 0)
_write_steps = 0


def _checkpoint() -> None:
    """Test hook: die here at the RJEPA_TEST_KILL_AT-th write step."""
    global _write_steps
    if _kill_at:
        _write_steps += 1
        if _write_steps == _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable, tag: str) -> dict:
    """Write `chunks` (bytes or C-contiguous arrays) to `path` atomically.

    Returns {"bytes": size, "sha256": hex digest}.
    """
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    h = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as f:
        for i, chunk in enumerate(chunks):
            buf = chunk.reshape(-1).view(np.uint8) if isinstance(chunk, np.ndarray) else chunk
            f.write(buf)
            h.update(buf)
            size += len(buf)
            if i == 0:
                f.flush()
                _checkpoint()  # a torn temporary file
        f.flush()
        os.fsync(f.fileno())
    _checkpoint()
    os.replace(tmp, path)
    _checkpoint()
    _fsync_dir(path.parent)
    _checkpoint()
    return {"bytes": size, "sha256": h.hexdigest()}


def _json_bytes(obj, indent: int | None = 1) -> bytes:
    # allow_nan=False: strict JSON (nothing non-finite reaches a manifest or entry)
    return (json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False) + "\n").encode("utf-8")


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    # allow_nan=False: a bare NaN / Infinity is not JSON; write_shard makes them null first
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8")


def file_sha256(path: Path, on_bytes=None) -> str:
    """sha256 of a file, streamed in 4 MiB blocks; `on_bytes(n)` after each block."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()

# ------------------------------------------------------------ safetensors


def run_poolings(config: dict) -> list[str]:
    """The poolings a run stores, in order (config "pooling": one name or a list)."""
    p = config.get("pooling", "mean")
    return [p] if isinstance(p, str) else [str(x) for x in p]


def latents_tensor(poolings: list[str], pooling: str) -> str:
    """Name of the shard tensor holding `pooling` (`latents` for the first)."""
    return "latents" if pooling == poolings[0] else f"latents.{pooling}"


def token_steps_of(spans: np.ndarray, num_tokens: int) -> np.ndarray:
    """int32 [num_tokens]: the step each token position belongs to (-1: none).
    Step spans do not overlap (the span rule); where they would, the first wins."""
    out = np.full(int(num_tokens), -1, np.int32)
    for j, (a, b) in enumerate(np.asarray(spans).tolist()):
        seg = out[a:b]
        seg[seg < 0] = j
    return out


def safetensors_chunks(tensors: list[tuple[str, str, np.ndarray]], metadata: dict | None = None) -> list:
    """Chunks of a safetensors file: 8-byte header size, JSON header, payloads.

    `tensors` = [(name, safetensors dtype, C-contiguous array)], written in this
    order; put 8-byte types first so every payload stays aligned. `metadata`
    (str -> str) joins the header's __metadata__.
    """
    header: dict = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                     **(metadata or {})}}
    offset = 0
    for name, st_dtype, arr in tensors:
        header[name] = {"dtype": st_dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # payload starts 8-byte aligned
    return [struct.pack("<Q", len(text)) + text] + [np.ascontiguousarray(a) for _, _, a in tensors]


def read_safetensors(path: Path, writable: bool = False) -> dict[str, np.ndarray]:
    """Parse a safetensors file and return views over its mmap: read-only, or
    with `writable` copy-on-write (still zero-copy; a write changes a private
    page, never the file), which torch.from_numpy needs."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise StoreError(f"{path}: too short to be a safetensors file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
    return _parse_safetensors(path, mm, size)[0]


_DAMAGED = ("; the file is damaged: `rjepa-latent verify RUN` lists every damaged shard, "
            "`rjepa-latent extract ... --repair` redoes them")


def _parse_safetensors(path: Path, mm, size: int) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as views of `mm`, the header's __metadata__)."""
    if size < 8:
        raise StoreError(f"{path}: too short to be a safetensors file{_DAMAGED}")
    (n,) = struct.unpack("<Q", mm[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise StoreError(f"{path}: header length {n} is out of bounds{_DAMAGED}")
    try:
        header = json.loads(bytes(mm[8:8 + n]))
    except ValueError as e:
        raise StoreError(f"{path}: header is not JSON ({e}){_DAMAGED}") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: header is not a JSON object{_DAMAGED}")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES.get(info.get("dtype"))
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise StoreError(f"{path}: tensor {name!r} has a malformed header entry{_DAMAGED}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if (dtype is None or min(shape, default=0) < 0 or start < 0
                or end - start != count * np.dtype(dtype).itemsize or 8 + n + end > size):
            raise StoreError(f"{path}: tensor {name!r} has an invalid dtype, size or offsets{_DAMAGED}")
        out[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start).reshape(shape)
    meta = header.get("__metadata__", {})
    return out, meta if isinstance(meta, dict) else {}


def shard_layout(config: dict, entry: dict) -> list[tuple[str, str, tuple]]:
    """[(tensor, safetensors dtype, shape)] a shard of this manifest entry holds, in file order."""
    nl, d = len(config["layers"]), config["hidden_size"]
    st_dtype = STORE_DTYPES[config["dtype"]][0]
    items, steps, tokens = entry["items"], entry["steps"], entry["tokens"]
    poolings = run_poolings(config)
    per_token = poolings == [TOKEN_POOLING]
    out = [("step_offsets", "I64", (items + 1,)), ("token_spans", "I32", (steps, 2))]
    if per_token:
        out += [("token_offsets", "I64", (items + 1,)), ("token_steps", "I32", (tokens,))]
    rows = tokens if per_token else steps
    out += [(latents_tensor(poolings, p), st_dtype, (nl, rows, d)) for p in poolings]
    return out


def check_shard_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict, config: dict,
                       entry: dict) -> None:
    """Raise StoreError (naming `path`) unless the shard's header agrees with its
    manifest entry: the tensors, their dtypes and shapes, the poolings, and the
    offsets (monotone, from 0 to the entry's steps / tokens)."""
    fix = _DAMAGED
    layout = shard_layout(config, entry)
    names = [n for n, _, _ in layout]
    if list(arrays) != names:
        raise StoreError(f"{path}: holds tensors {list(arrays)}, the manifest's run stores {names}{fix}")
    rev = {np.dtype(v): k for k, v in _ST_DTYPES.items()}   # uint16 -> BF16 (no U16 in a shard)
    for name, st_dtype, shape in layout:
        a = arrays[name]
        got = rev.get(a.dtype, str(a.dtype))
        if got != st_dtype or a.shape != shape:
            raise StoreError(f"{path}: tensor {name!r} is {got} {list(a.shape)}, the manifest says "
                             f"{st_dtype} {list(shape)} (items {entry['items']}, steps {entry['steps']}, "
                             f"tokens {entry['tokens']}){fix}")
    pool = meta.get("poolings")
    if pool is not None and pool != ",".join(run_poolings(config)):
        raise StoreError(f"{path}: header lists poolings {pool!r}, the run stores "
                         f"{','.join(run_poolings(config))!r}{fix}")
    ends = [("step_offsets", entry["steps"])]
    if "token_offsets" in arrays:
        ends.append(("token_offsets", entry["tokens"]))
    for name, last in ends:
        off = arrays[name]
        if off[0] != 0 or off[-1] != last or (np.diff(off) < 0).any():
            raise StoreError(f"{path}: {name} does not run from 0 to {last} in order{fix}")


def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (inputs are finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def f32_from_bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def convert_latents(lat: np.ndarray, dtype: str) -> tuple[np.ndarray | None, str | None]:
    """float32 latents -> stored dtype; (None, reason) when not representable."""
    if not np.isfinite(lat).all():
        return None, "latents contain NaN or infinity (the model overflowed in float32)"
    if dtype == "float32":
        return lat, None
    if dtype == "float16":
        peak = float(np.abs(lat).max()) if lat.size else 0.0
        if peak > 65504.0:
            return None, (f"latents overflow float16 (largest magnitude {peak:.4g} > 65504); "
                          "use --dtype bfloat16 or float32")
        return lat.astype(np.float16), None
    return bf16_from_f32(lat), None

# ------------------------------------------------------------ run directory


def journal_name(index: int) -> str:
    """The journal entry of shard `index`: written last when the shard commits."""
    return f"shard-{index:05d}.json"


def _load_json(path: Path, what: str = "manifest") -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: cannot read the {what}: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise StoreError(f"{path}: not an rjepa-latent {what}")
    if obj.get("format_version") not in READ_VERSIONS:
        raise StoreError(f"{path}: format version {obj.get('format_version')} is not one this "
                         f"rjepa-latent reads ({', '.join(map(str, READ_VERSIONS))})")
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _journal_names(out: Path) -> dict[int, str]:
    names = {}
    for p in out.iterdir():
        m = _JOURNAL.match(p.name)
        if m:
            names[int(m.group(1))] = p.name
    return names


def read_journal_entry(out: Path, index: int) -> dict:
    """Shard `index`'s journal entry, checked to be strict JSON of its own shard."""
    path = out / journal_name(index)
    entry = _load_json(path, "journal entry")
    try:
        ok = (entry["index"] == index and isinstance(entry["files"], dict)
              and isinstance(entry["errors"], list) and len(entry["records"]) == 2
              and all(isinstance(entry[k], int) for k in ("items", "steps", "tokens")))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise StoreError(f"{path}: not the journal entry of shard {index} (fields missing or "
                         f"malformed){_DAMAGED}")
    return entry


def read_journal(out: Path) -> dict[int, dict]:
    """Every committed shard's entry of a partial run, by index (one small file each)."""
    return {k: read_journal_entry(out, k) for k in sorted(_journal_names(out))}


def read_journal_lenient(out: Path) -> tuple[dict[int, dict], dict[str, str]]:
    """(the readable entries by index, {journal file: what is wrong} for the others)."""
    entries, bad = {}, {}
    for k in sorted(_journal_names(out)):
        try:
            entries[k] = _strip_entry(read_journal_entry(out, k))
        except StoreError as e:
            msg = str(e).split("; the file is damaged")[0]
            bad[journal_name(k)] = msg[len(f"{out / journal_name(k)}: "):] if msg.startswith(str(out)) else msg
    return entries, bad


def journal_bytes(entry: dict) -> bytes:
    """A journal file's exact bytes for `entry` (one line of strict JSON)."""
    return _json_bytes({"format": FORMAT, "format_version": FORMAT_VERSION, **entry}, indent=None)


def _strip_entry(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("format", "format_version")}


def read_manifests(out: Path) -> dict[str, dict]:
    """The run's manifests by file name, each {config, num_records, num_shards,
    complete, shards}. A finished run: manifest.json as written. A partial run of
    this format: manifest.json (the configuration) with its committed shards read
    from the journal (num_records and num_shards None: not known yet). A run of
    format 1: manifest.json and its part manifests as they were written."""
    if not out.is_dir():
        return {}
    if not (out / MANIFEST).is_file():
        parts = sorted(p.name for p in out.iterdir() if _PART_MANIFEST.match(p.name))
        return {name: _load_json(out / name) for name in parts}
    m = _load_json(out / MANIFEST)
    parts = sorted(p.name for p in out.iterdir() if _PART_MANIFEST.match(p.name))
    if m["format_version"] == 1:
        return {name: _load_json(out / name) for name in [MANIFEST] + parts}
    if parts:
        raise StoreError(f"{out}: holds format-1 part manifests ({parts[0]}) beside a format-2 run; "
                         "the directory mixes two runs: keep one run per directory")
    if not m.get("complete"):
        m = {**m, "num_records": None, "num_shards": None,
             "shards": [_strip_entry(e) for e in read_journal(out).values()]}
    return {MANIFEST: m}


def stored_config(out: Path) -> dict | None:
    """The configuration in manifest.json (None: no readable run there)."""
    try:
        return _load_json(Path(out) / MANIFEST).get("config") if (Path(out) / MANIFEST).is_file() else None
    except StoreError:
        return None


def config_differences(stored: dict, requested: dict, ignore: Iterable[str] = ()) -> list[str]:
    lines = []
    for key in sorted((set(stored) | set(requested)) - set(ignore)):
        if stored.get(key) != requested.get(key):
            lines.append(f"  {key}: stored {stored.get(key)!r}, requested {requested.get(key)!r}")
    return lines


def write_tag(index: int | str) -> str:
    """The temporary-file tag of one writer: host, process and shard, so two
    workers (on one host or several sharing a directory) never share or delete
    each other's temporary files."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{index}"


def commit_shard(out: Path, config: dict, index: int, records: tuple[int, int], items: list,
                 latents: list[np.ndarray], errors: list[dict], kernel: str | None = None) -> dict:
    """Write shard `index` and commit it: its .safetensors and .jsonl, then its
    journal entry (each atomic and fsynced), so whatever has an entry is complete.
    Needs no lock: shards are disjoint files and temporaries carry a unique tag
    (`write_tag`), so processes may commit different shards into one directory at
    once. Items in input order, latents already in the stored dtype: per item
    [n_layers, n_rows, hidden], or [n_poolings, n_layers, n_rows, hidden] for a
    run of several poolings; rows are steps, or tokens for a per-token run."""
    tag = write_tag(index)
    name = f"shard-{index:05d}"
    nl, d = len(config["layers"]), config["hidden_size"]
    st_dtype, np_dtype = STORE_DTYPES[config["dtype"]]
    poolings = run_poolings(config)
    per_token = poolings == [TOKEN_POOLING]
    lats = [lat[None] if lat.ndim == 3 else lat for lat in latents]   # [P, nl, rows, d]
    for it, lat in zip(items, lats):
        rows_want = len(it.ids) if per_token else len(it.spans)
        if lat.shape != (len(poolings), nl, rows_want, d):
            raise StoreError(f"item {it.id!r}: latents of shape {tuple(lat.shape)}, the run stores "
                             f"{(len(poolings), nl, rows_want, d)} (poolings, layers, rows, hidden)")
    steps = [len(it.spans) for it in items]
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(steps, out=offsets[1:])
    spans = (np.concatenate([it.spans for it in items]) if items else np.zeros((0, 2), np.int32)).astype(np.int32)
    tensors = [("step_offsets", "I64", offsets), ("token_spans", "I32", spans)]
    if per_token:
        tok_offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum([len(it.ids) for it in items], out=tok_offsets[1:])
        token_steps = (np.concatenate([token_steps_of(it.spans, len(it.ids)) for it in items])
                       if items else np.zeros(0, np.int32))
        tensors += [("token_offsets", "I64", tok_offsets), ("token_steps", "I32", token_steps)]
    for q, p in enumerate(poolings):
        lat = (np.concatenate([x[q] for x in lats], axis=1) if lats else
               np.zeros((nl, 0, d), np_dtype)).astype(np_dtype, copy=False)
        tensors.append((latents_tensor(poolings, p), st_dtype, lat))
    rows = [_sidecar_row(it, int(c)) for it, c in zip(items, steps)]   # checked before any write
    st = atomic_write(out / f"{name}.safetensors", safetensors_chunks(
        tensors, {"poolings": ",".join(poolings)}), tag)
    js = atomic_write(out / f"{name}.jsonl", [_jsonl_bytes(rows)], tag)
    entry = {"index": index, "records": [int(records[0]), int(records[1])], "items": len(items),
             "steps": int(offsets[-1]), "tokens": int(sum(len(it.ids) for it in items)),
             "errors": errors, "files": {f"{name}.safetensors": st, f"{name}.jsonl": js}}
    if kernel is not None:
        entry["kernel"] = kernel  # the kernel identity that computed this shard
    atomic_write(out / journal_name(index), [journal_bytes(entry)], tag)
    return entry


def check_run_config(out: Path, stored: dict, requested: dict, allow_kernel_change: bool,
                     ignore: Iterable[str] = ()) -> None:
    """Raise StoreError (nothing changed) unless `requested` may continue the run
    configured as `stored`; `ignore`: fields the caller checks itself (a run's extent)."""
    missing = [k for k in ENGINE_IDENTITY if k in requested and k not in stored]
    if missing:
        raise StoreError(
            f"{out} holds a run that does not record which engine computed it "
            f"(no {', '.join(missing)}: written by an older rjepa-latent); resuming it could mix "
            "bytes of different engines, so it is refused and nothing was changed. Extract into "
            "a new --out (or delete this directory to start it again).")
    skip = set(ignore) | ({"engine_kernel"} if allow_kernel_change else set())
    diff = config_differences(stored, requested, skip)
    if diff:
        only_kernel = [line.split(":")[0].strip() for line in diff] == ["engine_kernel"]
        hint = ("\nOnly the kernel differs: allow_kernel_change=True (--allow-kernel-change) "
                "continues under it, recording each shard's kernel." if only_kernel else "")
        if "engine_batch_tokens" in stored and any(
                line.split(":")[0].strip() == "engine_batch_tokens" for line in diff):
            hint += (f"\nThe batch budget differs (on CUDA it decides the bytes): pass "
                     f"--max-batch-tokens {stored['engine_batch_tokens']} (max_batch_tokens="
                     f"{stored['engine_batch_tokens']}) to resume with the stored one.")
        raise StoreError(f"{out} holds a run with a different configuration; "
                         "nothing was changed. Differences:\n" + "\n".join(diff) +
                         "\nUse another --out, or the options of the stored run." + hint)


class RunStore:
    """The driver's side of a run directory: its configuration (checked against a
    stored run before anything is written), the committed shards (its journal),
    the directory lock, the start manifest and the final one (`finish`).
    Shards themselves are committed by `commit_shard` (`write_shard` here), by
    this process or by any other one.

    `part` = (i, n): this driver's worker of n sharing the directory (a shared
    lock; each drops only stale temporaries of its own shards). `extent`: the
    fields that say how far the run reaches (its inputs, a limit); a stored
    value that differs is accepted when `grows(stored, requested)` says the
    requested run extends the stored one, else refused as a clash."""

    def __init__(self, out: str | Path, config: dict, part: tuple[int, int] = (0, 1),
                 allow_kernel_change: bool = False, extent: Iterable[str] = (), grows=None):
        self.out = Path(out)
        self.part = part
        self.kernel = config.get("engine_kernel")  # what this process computes with
        self._check_directory()
        self.config = config
        self.grown = False
        self.entries: dict[int, dict] = {}
        self.bad_entries: dict[str, str] = {}
        self._stored: dict | None = None
        self._lock_fd = None
        self.num_records: int | None = None
        if not (self.out / MANIFEST).is_file():
            old = [p.name for p in self.out.iterdir() if _PART_MANIFEST.match(p.name)] \
                if self.out.is_dir() else []
            if old:
                raise StoreError(_OLD_FORMAT.format(out=self.out))
            return
        m = _load_json(self.out / MANIFEST)
        if m["format_version"] != FORMAT_VERSION:
            raise StoreError(_OLD_FORMAT.format(out=self.out))
        stored = m["config"]
        check_run_config(self.out, stored, config, allow_kernel_change, extent)
        changed = [k for k in extent if stored.get(k) != config.get(k)]
        if changed:
            if grows is None or not grows(stored, config):
                diff = config_differences({k: stored.get(k) for k in changed},
                                          {k: config.get(k) for k in changed})
                raise StoreError(f"{self.out} holds a run over other data and the new data does "
                                 "not extend it (not an append of records to the last JSONL input, "
                                 "nor a higher limit); nothing was changed. Differences:\n"
                                 + "\n".join(diff) + "\nUse another --out, or the data of the "
                                 "stored run.")
            self.grown = True
        # the run's configuration (its kernel may differ, if allowed; a grown run's extent is new)
        self.config = {**stored, **{k: config[k] for k in extent if k in config}}
        for k in extent:
            if k not in config:
                self.config.pop(k, None)
        self._stored = m
        if m.get("complete"):
            self.entries = {s["index"]: s for s in m["shards"]}
            if self.grown:   # finished over less data: not complete any more
                self._stored = {**m, "complete": False}
        else:
            self._read_journal()

    def _read_journal(self) -> None:
        """The committed entries; an unreadable entry file is damage (`bad_entries`),
        which --repair redoes like any damaged shard."""
        entries, bad = read_journal_lenient(self.out)
        self.entries.update(entries)   # the journal on disk is authoritative
        self.bad_entries.update({f: why for f, why in bad.items()
                                 if int(_JOURNAL.match(f).group(1)) not in self.entries})

    def _check_directory(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise StoreError(f"--out {self.out} exists and is not a directory")
        if self.out.is_dir():
            foreign = sorted(p.name for p in self.out.iterdir() if not _OWN_FILE.match(p.name))
            if foreign:
                raise StoreError(f"--out {self.out} holds files that are not from rjepa-latent "
                                 f"({', '.join(foreign[:5])}); use an empty or new directory")

    @property
    def manifests(self) -> dict[str, dict]:
        """The run as `read_manifests` sees it, from what this store loaded."""
        if self._stored is None:
            return {}
        return {MANIFEST: {**self._stored, "shards": [self.entries[k] for k in sorted(self.entries)]}}

    def done(self) -> dict[int, dict]:
        """The committed shards: {index: entry}."""
        return self.entries

    def is_complete(self) -> bool:
        return bool(self._stored and self._stored.get("complete"))

    def stored_num_records(self) -> int | None:
        return self._stored.get("num_records") if self._stored else None

    def prepare(self, num_records: int | None = None) -> None:
        """Create the directory, take the lock, drop stale temporaries (a single
        run: all; a part worker: those of its own shards) and write the start
        manifest (the configuration, complete: false)."""
        if num_records is not None:
            self.num_records = num_records
        self.out.mkdir(parents=True, exist_ok=True)
        solo = self.part[1] == 1
        self._lock_directory(solo)
        i, n = self.part
        for p in self.out.iterdir():
            m = _TMP.match(p.name)
            if m and (solo or (m.group(1) is not None and int(m.group(1)) % n == i)):   # never another's
                p.unlink(missing_ok=True)
        start = self._start_manifest()
        if self._stored is None or self._stored != start:
            self._put_manifest(start)

    def _start_manifest(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config,
                "complete": False}

    def reopen(self) -> None:
        """A finished run about to change (repair, growing): back to a start manifest."""
        if self._stored is not None and self._stored.get("complete"):
            self._put_manifest(self._start_manifest())

    def _lock_directory(self, solo: bool) -> None:
        """Held until close() or process exit: a single run (or a driver) locks the
        directory exclusively, `--part` workers share it, so two runs that would
        delete each other's temporary files cannot write to one directory at once.
        Shard workers committing for the lock holder need no lock."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if solo else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.out} is in use by another rjepa-latent run (a single run "
                             f"cannot share a directory; --part workers can share one only with "
                             f"each other); wait for it to finish or stop it") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Releases the directory lock (the files are complete already)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    @property
    def num_shards(self) -> int | None:
        if self.num_records is None:
            return None
        s = self.config["shard_size"]
        return (self.num_records + s - 1) // s

    def write_shard(self, index: int, records: tuple[int, int], items: list, latents: list[np.ndarray],
                    errors: list[dict]) -> dict:
        """Commit shard `index` from this process (`commit_shard`) and note its entry."""
        entry = commit_shard(self.out, self.config, index, records, items, latents, errors, self.kernel)
        self.entries[index] = entry
        return entry

    def note(self, entry: dict) -> None:
        """A shard another process committed (its entry, as `commit_shard` returned it)."""
        self.entries[int(entry["index"])] = entry

    def check_committed(self, full: bool = False, progress: bool = False) -> dict[str, str]:
        """Problems of the committed shards and of errors.jsonl, as {file name: what
        is wrong}; see `verify_run` (`full` adds the payload sha256)."""
        return {**self.bad_entries, **_verify(self.out, self.manifests, full, progress)}

    def forget(self, files: Iterable[str]) -> list[int]:
        """Drop the shards of `files` (damaged) from the committed ones, so this run
        recomputes them (their files and journal entries are replaced when they
        commit again). Returns the shard indices dropped."""
        idx = sorted({int(m.group(1)) for f in files if (m := re.match(r"^shard-(\d{5,})\.", f))})
        for k in idx:
            self.entries.pop(k, None)
            self.bad_entries.pop(journal_name(k), None)
        if idx and self._stored is not None:
            self._stored = {**self._stored, "complete": False}
        return idx

    def refresh(self) -> None:
        """Re-read the journal: shards committed by other processes since."""
        self._read_journal()

    def finish(self, num_records: int) -> bool:
        """Once every shard of `num_records` records is committed (with exactly its
        record range): write errors.jsonl, then manifest.json with complete: true
        and every entry (so a reader of a finished run reads one file). Idempotent;
        returns whether the run is complete."""
        self.num_records = num_records
        if self.part[1] > 1:
            self.refresh()   # other workers commit concurrently
        s = self.config["shard_size"]
        n = self.num_shards

        def covered() -> bool:
            return all((e := self.entries.get(k)) is not None
                       and list(e["records"]) == [k * s, min((k + 1) * s, num_records)] for k in range(n))
        if not covered():
            self.refresh()   # shards other processes committed and nobody noted
            if not covered():
                return False
        extra = sorted(k for k in self.entries if k >= n)
        if extra:
            raise StoreError(f"{self.out}: committed shard(s) {extra[:5]} lie beyond the "
                             f"{num_records} records of the inputs; the directory was modified "
                             "outside rjepa-latent")
        listed = [self.entries[k] for k in range(n)]
        final = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config,
                 "num_records": num_records, "num_shards": n, "complete": True,
                 "totals": {key: sum(e[key] for e in listed) for key in ("items", "steps", "tokens")}
                 | {"errors": sum(len(e["errors"]) for e in listed)},
                 "shards": listed}
        if self._stored == final and (self.out / ERRORS).is_file():
            return True
        self.write_errors(e for x in listed for e in x["errors"])
        self._put_manifest(final)
        return True

    def rewrite_errors(self) -> None:
        """Rewrite errors.jsonl from the committed entries (it is derived from them)."""
        self.write_errors(e for k in sorted(self.entries) for e in self.entries[k]["errors"])

    def write_errors(self, rows: Iterable[dict]) -> None:
        atomic_write(self.out / ERRORS, [_jsonl_bytes(rows)], write_tag("errors"))

    def _put_manifest(self, manifest: dict) -> None:
        atomic_write(self.out / MANIFEST, [_json_bytes(manifest)], write_tag("manifest"))
        self._stored = manifest


_OLD_FORMAT = ("{out} holds a run of format 1 (one manifest rewritten per shard); this rjepa-latent "
               "writes format 2 (a journal file per shard) and does not resume or grow format 1 "
               "runs. Its finished shards stay readable (open_latents, info, verify, export); to "
               "finish it, extract into a new --out (or delete this directory and start again).")


NONFINITE = "nonfinite_fields"   # sidecar key: carried fields whose non-finite float became null


def _sidecar_row(it, num_steps: int) -> dict:
    """An item's .jsonl line: strict JSON (a non-finite float in a carried field
    becomes null, its name listed in `nonfinite_fields`); a carried field never
    replaces a reserved key."""
    row = {"id": it.id, "num_steps": num_steps, "num_tokens": int(len(it.ids)), "text": it.text,
           "source": it.source, "line": it.line}
    clash = sorted(set(it.meta) & set(row))
    if clash:   # data.py renames these record_<name>: reaching here is a bug, never silent
        raise StoreError(f"item {it.id!r}: carried metadata field(s) {clash} would replace reserved "
                         "sidecar keys (the reader renames them record_<name>); this is a bug")
    nonfinite = []
    for k, v in it.meta.items():
        if k == NONFINITE:   # an input field of that name: record_<name>, made unique
            while k in it.meta or k in row:
                k = f"record_{k}"
        if isinstance(v, float) and not np.isfinite(v):
            nonfinite.append(k)   # the name it is stored under
            v = None
        row[k] = v
    if nonfinite:
        row[NONFINITE] = nonfinite
    return row


def _shard_problem(out: Path, config: dict, entry: dict, full: bool, on_bytes=None) -> dict[str, str]:
    """{file: problem} of one listed shard: missing, size, sidecar sha256, header
    vs manifest; with `full` the payload sha256 too."""
    problems = {}
    for fname, info in entry["files"].items():
        p = out / fname
        if not p.is_file():
            problems[fname] = "missing"
        elif p.stat().st_size != info["bytes"]:
            problems[fname] = f"{p.stat().st_size} bytes, the manifest says {info['bytes']}"
        elif fname.endswith(".jsonl"):
            if file_sha256(p, on_bytes) != info["sha256"]:
                problems[fname] = "sha256 differs from the manifest's (its content changed)"
        else:   # the header first (the more telling reason), then with `full` the whole file's hash
            try:
                with open(p, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                arrays, meta = _parse_safetensors(p, mm, info["bytes"])
                check_shard_arrays(p, arrays, meta, config, entry)
            except StoreError as e:
                msg = str(e).split("; the file is damaged")[0]
                problems[fname] = msg[len(f"{p}: "):] if msg.startswith(f"{p}: ") else msg
            except ValueError as e:  # mmap of an empty file
                problems[fname] = f"cannot be mapped ({e})"
            if fname not in problems and full and file_sha256(p, on_bytes) != info["sha256"]:
                problems[fname] = "sha256 differs from the manifest's (its payload changed)"
    return problems


def listed_shards(manifests: dict[str, dict]) -> dict[int, dict]:
    entries: dict[int, dict] = {}
    for m in manifests.values():
        for s in m["shards"]:
            entries.setdefault(s["index"], s)
    return entries


def _verify(out: Path, manifests: dict[str, dict], full: bool, progress: bool) -> dict[str, str]:
    if not manifests:
        return {}
    config = next(iter(manifests.values()))["config"]
    entries = listed_shards(manifests)
    total = sum(i["bytes"] for s in entries.values() for i in s["files"].values()) if full else 0
    state = {"done": 0, "shown": 0.0}
    show = progress and full and total > VERIFY_PROGRESS_BYTES

    def on_bytes(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if show and now - state["shown"] >= 1.0:
            state["shown"] = now
            print(f"rjepa-latent verify: {state['done'] / 2**30:.2f} / {total / 2**30:.2f} GiB hashed",
                  file=sys.stderr, flush=True)
    problems: dict[str, str] = {}
    for k in sorted(entries):
        problems.update(_shard_problem(out, config, entries[k], full, on_bytes))
    m = manifests.get(MANIFEST)
    if m is not None and m.get("format_version") == FORMAT_VERSION and m["complete"]:
        for k in sorted(entries):   # a finished run keeps its journal: each file equals its entry
            p = out / journal_name(k)
            if not p.is_file() or p.read_bytes() != journal_bytes(entries[k]):
                problems[journal_name(k)] = "missing or not the manifest's entry of its shard"
    if m is not None and m["complete"]:   # errors.jsonl is derived from the complete manifest
        want = _jsonl_bytes(e for s in m["shards"] for e in s["errors"])
        p = out / ERRORS
        if not p.is_file() or p.read_bytes() != want:
            problems[ERRORS] = "missing or not what the manifest's error lists give (it is derived from them)"
    return problems


def verify_run(path: str | Path, full: bool = True, progress: bool = False) -> dict[str, str]:
    """Check a run directory: every listed shard file present, of its size, its
    header consistent with the manifest, its sidecar's sha256 (and with `full`,
    the default, every payload's sha256, streamed); errors.jsonl equal to what
    the complete manifest derives. Returns {file name: what is wrong} (empty:
    all sound). Raises StoreError when the manifests cannot be read."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    bad: dict[str, str] = {}
    m = _load_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
    if m is not None and m["format_version"] == FORMAT_VERSION and not m.get("complete"):
        entries, bad = read_journal_lenient(path)   # a damaged entry is listed, not fatal
        manifests = {MANIFEST: {**m, "num_records": None, "num_shards": None,
                                "shards": [entries[k] for k in sorted(entries)]}}
    else:
        manifests = read_manifests(path)
    if not manifests:
        raise StoreError(f"{path} has no manifest.json: not an rjepa-latent run directory "
                         "(or no shard finished yet)")
    problems = {**bad, **_verify(path, manifests, full, progress)}
    if m is not None and m["format_version"] == FORMAT_VERSION and m.get("complete"):
        listed = {s["index"] for s in m["shards"]}   # a finished run lists every entry it has
        for k, name in sorted(_journal_names(path).items()):
            if k not in listed:
                problems[name] = (f"a journal entry of shard {k}, which the finished run does not "
                                  f"hold (its {m['num_shards']} shards are listed in {MANIFEST}); "
                                  "not written by this run: delete it")
    return problems


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w-])")   # standalone: UTF-8, 0xff, float16 stay


def error_kind(reason: str) -> str:
    """The one grouping rule of error reasons (extract's summary, `info`): the
    text before the first ': ' (or ' (' or '; '), quoted values as '…' and
    standalone numbers as N, at most 80 characters, so like errors group."""
    head = re.split(r": | \(|; ", reason, maxsplit=1)[0]
    return _NUMBER.sub("N", _QUOTED.sub("'…'", head))[:80]


def damage_report(path: Path, problems: dict[str, str]) -> str:
    return "\n".join(f"  {path / f}: {why}" for f, why in sorted(problems.items()))

# ------------------------------------------------------------ reader


class LatentItem:
    """One stored item: `id`, `latents` [n_layers, n_steps, hidden] of the run's
    first pooling (per-token runs: [n_layers, n_tokens, hidden]), `pooled(name)`
    for any stored pooling, `token_spans` [n_steps, 2], `token_steps`
    [n_tokens], `meta` (its shard-jsonl line)."""

    def __init__(self, raws: dict[str, np.ndarray], token_spans: np.ndarray, meta: dict, bf16: bool,
                 token_steps: np.ndarray | None = None):
        self._raws = raws                       # pooling -> zero-copy view, in run order
        self.poolings = list(raws)
        self.raw_latents = raws[self.poolings[0]]
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
    def token_steps(self) -> np.ndarray:
        """int32 [num_tokens]: each token position's step index, -1 outside every
        step (a zero-copy view in per-token runs; derived from token_spans otherwise)."""
        if self._token_steps is None:
            self._token_steps = token_steps_of(self.token_spans, int(self.meta["num_tokens"]))
        return self._token_steps

    def __repr__(self) -> str:
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
        self.per_token = self.poolings == [TOKEN_POOLING]
        self._meta: list[list[dict]] = []
        self._where: list[tuple[int, int]] = []
        for si, s in enumerate(self.shards):
            jsonl = self.path / f"shard-{s['index']:05d}.jsonl"
            rows = _read_sidecar(jsonl, s["files"].get(jsonl.name, {}))
            if len(rows) != s["items"]:
                raise StoreError(f"{jsonl}: {len(rows)} lines, the manifest says {s['items']}")
            self._meta.append(rows)
            self._where.extend((si, j) for j in range(len(rows)))
        self.ids = [row["id"] for rows in self._meta for row in rows]
        self._pos = {i: p for p, i in enumerate(self.ids)}
        # each open shard holds an mmap and so a file descriptor: keep only the
        # most recently used ones (a shard's mmap lives on while views of it do)
        self._arrays: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.ids)

    def shard_meta(self, si: int) -> list[dict]:
        """Metadata rows of the si-th stored shard (in shard order)."""
        return self._meta[si]

    def to_hf_dataset(self, layer: int = -2, pooling: str | None = None):
        """A `datasets.Dataset`: id, latents [num_steps, hidden] of `layer` and
        `pooling` (default the run's first; per-token runs: [num_tokens, hidden]
        and token_steps), num_steps, num_tokens, carried metadata
        (rjepa_latent.readers)."""
        from .readers import to_hf_dataset
        return to_hf_dataset(self, layer, pooling)

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
        except OSError as e:
            raise StoreError(f"{path}: cannot open the shard ({e.strerror}); it is listed in the "
                             "manifest: `rjepa-latent extract ... --repair` redoes it") from None
        arrays, meta = _parse_safetensors(path, mm, size)
        check_shard_arrays(path, arrays, meta, self.config, entry)
        self._arrays[si] = arrays
        if len(self._arrays) > MAX_OPEN_SHARDS:
            self._arrays.popitem(last=False)
        return arrays

    def __getitem__(self, key: int | str) -> LatentItem:
        if isinstance(key, str):
            if key not in self._pos:
                raise KeyError(f"no item with id {key!r}")
            pos = self._pos[key]
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            pos = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= pos < len(self):
                raise IndexError(f"item index {key} out of range for {len(self)} items")
        else:
            raise TypeError(f"index by position (int) or id (str), not {type(key).__name__}")
        si, j = self._where[pos]
        arr = self.shard_arrays(si)
        a, b = int(arr["step_offsets"][j]), int(arr["step_offsets"][j + 1])
        ra, rb, token_steps = a, b, None
        if self.per_token:
            ra, rb = int(arr["token_offsets"][j]), int(arr["token_offsets"][j + 1])
            token_steps = arr["token_steps"][ra:rb]
        raws = {p: arr[latents_tensor(self.poolings, p)][:, ra:rb, :] for p in self.poolings}
        return LatentItem(raws, arr["token_spans"][a:b], self._meta[si][j], self.dtype == "bfloat16",
                          token_steps)

    def __iter__(self) -> Iterator[LatentItem]:
        for p in range(len(self)):
            yield self[p]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"LatentStore({str(self.path)!r}, {len(self)} items, {len(self.errors)} errors, {state})"


def _read_sidecar(path: Path, info: dict) -> list[dict]:
    """A shard's .jsonl rows, after checking its size and sha256 against the manifest."""
    fix = "; `rjepa-latent extract ... --repair` redoes the shard"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{path}: cannot read the shard's metadata ({e.strerror}){fix}") from None
    if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise StoreError(f"{path}: size or sha256 differs from the manifest's (the file was changed "
                         f"after it was written){fix}")
    rows = []
    # split on "\n" only: str.splitlines() also splits at U+2028, U+0085...,
    # which json.dumps leaves unescaped inside strings
    for n, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise StoreError(f"{path}: line {n} is not JSON ({e}){fix}") from None
    return rows


def open_latents(path: str | Path, writable: bool = False, verify: bool = False,
                 progress: bool = True) -> LatentStore:
    """Open a run directory (complete or partial: finished shards only) for
    reading; `writable` maps shards copy-on-write: arrays may be written in
    memory, privately to this process (the files never change), and such a
    write is seen by later accesses of the same shard while it stays mapped.
    Every shard's header is checked against the
    manifest when it is first mapped, every sidecar's sha256 on open;
    `verify` also hashes every payload first (a full read) and raises
    StoreError listing each damaged or missing file (`progress`: its progress
    line on large runs, stderr)."""
    return LatentStore(path, writable, verify, progress)

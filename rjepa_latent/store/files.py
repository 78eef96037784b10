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
  size, its header against the manifest entry (dtypes, shapes, data offsets,
  the counts of items, steps, tokens and poolings) and the sha256 of its
  sidecar (.jsonl, small); the payload sha256 once per process and file
  state (store/integrity.py), and every sha256 at once on request
  (`verify_run`, `open_latents(verify=True)`, `rjepa-latent verify`,
  `extract --repair`). manifest.json carries `manifest_sha256` over its
  content and each journal entry `config_sha256`, so an edited manifest is
  refused (`ManifestEdited`). Every problem is a StoreError naming the file.
  Sidecars are strict JSON: a non-finite float in a carried field is written
  as null and its name listed in the row's `nonfinite_fields`.
- Test hook: RJEPA_TEST_KILL_AT=k SIGKILLs the process at the k-th write
  step (mid-write, after fsync, after rename, after the directory fsync), so
  tests can kill deterministically at many distinct instants.
"""
from __future__ import annotations

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
from pathlib import Path
from typing import Iterable

import numpy as np

from ..engine.model import TOKEN_POOLING
from ..errors import StoreError
from .integrity import (MANIFEST_SHA256, ManifestEdited, check_manifest, check_offsets, config_digest,
                        stray_files)


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
_OWN_FILE = re.compile(r"^(quarantine|manifest(\.part-\d{5}-of-\d{5})?\.json"
                       r"|shard-\d{5,}\.(safetensors|jsonl|json)"
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


def run_sites(config: dict) -> list[str]:
    """The activation sites a run stores (canonical names, in order; none for a run of layers)."""
    return [str(x) for x in config.get("sites", ())]


def site_tensor(poolings: list[str], pooling: str, site: str) -> str:
    """Name of the shard tensor holding `site` under `pooling`: the site's name for
    the run's first pooling, `<site>@<pooling>` for each further one."""
    return site if pooling == poolings[0] else f"{site}@{pooling}"


def site_width(config: dict, site: str) -> int:
    """Floats per row of a stored site (config: the run's, with the model's widths)."""
    return int(config["site_widths"][run_sites(config).index(site)])


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
        if "token_selection" in config:   # each row's position, token id, norm
            from .token_rows import token_key_layout
            out += token_key_layout(config, tokens)
    rows = tokens if per_token else steps
    if nl:
        out += [(latents_tensor(poolings, p), st_dtype, (nl, rows, d)) for p in poolings]
    out += [(site_tensor(poolings, p, s), st_dtype, (rows, site_width(config, s)))
            for p in poolings for s in run_sites(config)]
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
    check_offsets(path, arrays, layout, _DAMAGED)
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


def _load_json(path: Path, what: str = "manifest", check: bool = True) -> dict:
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
    if path.name == MANIFEST:
        if check:
            check_manifest(path, obj, FORMAT_VERSION)
        obj.pop(MANIFEST_SHA256, None)   # the content, as every reader and writer sees it
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


def read_journal_entry(out: Path, index: int, config: dict | None = None) -> dict:
    """Shard `index`'s journal entry, checked to be strict JSON of its own shard
    (and, given the run's `config`, computed under it)."""
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
    if config is not None and entry.get("config_sha256", config_digest(config)) != config_digest(config):
        raise StoreError(f"{path}: computed under another configuration than {MANIFEST}'s (another "
                         f"run's shard, or {MANIFEST} was edited){_DAMAGED}")
    return entry


def read_journal(out: Path, config: dict | None = None) -> dict[int, dict]:
    """Every committed shard's entry of a partial run, by index (one small file each)."""
    return {k: read_journal_entry(out, k, config) for k in sorted(_journal_names(out))}


def read_journal_lenient(out: Path, config: dict | None = None) -> tuple[dict[int, dict], dict[str, str]]:
    """(the readable entries by index, {journal file: what is wrong} for the others)."""
    entries, bad = {}, {}
    for k in sorted(_journal_names(out)):
        try:
            entries[k] = _strip_entry(read_journal_entry(out, k, config))
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
             "shards": [_strip_entry(e) for e in read_journal(out, m["config"]).values()]}
    return {MANIFEST: m}


def stored_config(out: Path) -> dict | None:
    """The configuration in manifest.json (None: no readable run there)."""
    try:
        path = Path(out) / MANIFEST   # unchecked: RunStore checks it (and may mend it)
        return _load_json(path, check=False).get("config") if path.is_file() else None
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
    try:
        m = _load_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
    except ManifestEdited as e:   # nothing else can be checked against it
        return {MANIFEST: str(e)[len(f"{path / MANIFEST}: "):].split("; ")[0]
                + "; `rjepa-latent extract ... --repair` with the run's own options rebuilds it "
                "from the journal"}
    if m is not None and m["format_version"] == FORMAT_VERSION and not m.get("complete"):
        entries, bad = read_journal_lenient(path, m["config"])   # a damaged entry is listed, not fatal
        manifests = {MANIFEST: {**m, "num_records": None, "num_shards": None,
                                "shards": [entries[k] for k in sorted(entries)]}}
    else:
        manifests = read_manifests(path)
    if not manifests:
        raise StoreError(f"{path} has no manifest.json: not an rjepa-latent run directory "
                         "(or no shard finished yet)")
    problems = {**bad, **_verify(path, manifests, full, progress)}
    if m is not None and m["format_version"] == FORMAT_VERSION and m.get("complete"):
        # a finished run lists every shard it has: any other shard file is a stray
        problems.update(stray_files(path, {s["index"] for s in m["shards"]}))
    return problems


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w-])")   # standalone: UTF-8, 0xff, float16 stay


def counted(n: int, noun: str) -> str:
    """'1 shard', '2 shards', '1,200 records': a count and its noun, in the
    right number (nouns here take a plain -s)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def error_kind(reason: str) -> str:
    """The one grouping rule of error reasons (extract's summary, `info`): the
    text before the first ': ' (or ' (' or '; '), quoted values as '…' and
    standalone numbers as N, at most 80 characters, so like errors group."""
    head = re.split(r": | \(|; ", reason, maxsplit=1)[0]
    return _NUMBER.sub("N", _QUOTED.sub("'…'", head))[:80]


def damage_report(path: Path, problems: dict[str, str]) -> str:
    return "\n".join(f"  {path / f}: {why}" for f, why in sorted(problems.items()))


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

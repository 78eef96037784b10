"""What makes a reader and a resume trust a run directory: shard payloads,
tensor offsets, the manifest, and the shard files it holds.

- A reader (open_latents, LatentDataset, the exports) hashes a shard's
  .safetensors the first time this process maps it and compares the sha256
  with the manifest's; the result is kept per process by the file's identity
  (path, size, mtime_ns, ctime_ns, inode), so a shard is hashed once however
  often it is mapped again, and again if the file is replaced or written to.
  `open_latents(run, check="header")` or RJEPA_TRUST_SHARDS=1 skips the hash
  (the header and the sidecar are still checked) for a run verified already.
- A resume (extract on an existing run, --repair, growth) trusts a committed
  shard file only when it was hashed since it was committed: the writer notes
  the file's identity and sha256 when it commits the shard, a resume hashes
  every file whose identity is not noted with the manifest's sha256. Notes
  live outside the run directory (under the user's cache directory, one small
  file per shard file), so the run's files stay byte-identical whoever wrote
  them; a lost note only costs one more hash. ctime_ns is part of the
  identity because no user call can set it: a write followed by restoring
  the mtime is still seen.
- Each tensor of a shard lies where the layout the manifest implies puts it
  (back to back, in file order): equal shapes cannot trade places.
- manifest.json carries `manifest_sha256` over its content, and every journal
  entry `config_sha256` (the configuration without its extent); a finished
  manifest's shard list must agree with itself and with the entries'
  configuration, else ManifestEdited. The journal is the source of truth:
  `extract --repair` rebuilds an edited manifest from it when the entries
  confirm the command's configuration and the command names the same data.
- Strays: shard files a run does not hold (another run's, a copy) are
  reported by verify and by a resume, and `extract --repair` moves them into
  quarantine/ inside the run directory, in a partial run (when it finishes
  and so knows its shard count) as in a finished one.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import StoreError

QUARANTINE = "quarantine"   # where --repair moves shard files that are not the run's
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.(safetensors|jsonl|json)$")
TRUST_ENV = "RJEPA_TRUST_SHARDS"
CHECKS = ("payload", "header")   # open_latents(check=...): what a first mapping checks
CACHE_ENV = "RJEPA_CACHE_DIR"

_seen: dict[tuple, str] = {}     # file identity -> sha256 this process computed


def reader_check(check: str | None) -> str:
    """The check a reader makes ("payload" unless `check` or RJEPA_TRUST_SHARDS says
    "header"); ValueError for a value that is neither."""
    if check is None:
        return "header" if os.environ.get(TRUST_ENV, "") not in ("", "0") else "payload"
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(map(repr, CHECKS))}, got {check!r}")
    return check


def file_identity(path: Path, st: os.stat_result) -> tuple:
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


_HASH_BLOCK = 8 << 20


def payload_sha256(buf) -> str:
    """sha256 of a mapped file, in blocks (hashlib releases the GIL over each);
    the pages of each block are handed back to the kernel once hashed, so a
    reader that checks a whole run keeps its memory flat (they stay in the page
    cache and fault back in when the item is read)."""
    h = hashlib.sha256()
    view = memoryview(buf)
    drop = getattr(buf, "madvise", None) if hasattr(mmap, "MADV_DONTNEED") else None
    for start in range(0, len(view), _HASH_BLOCK):
        end = min(start + _HASH_BLOCK, len(view))
        h.update(view[start:end])
        if drop is not None:
            drop(mmap.MADV_DONTNEED, start, end - start)
    view.release()
    return h.hexdigest()


def check_mapped_payload(path: Path, st: os.stat_result, mm, info: dict, check: str | None = None) -> None:
    """Raise StoreError naming `path` unless the mapped file's sha256 is the manifest's
    (`info`: the entry's {"bytes", "sha256"}; `st`: the mapped file's fstat); once per
    process and file identity."""
    if reader_check(check) == "header":
        return
    key = file_identity(path, st)
    got = _seen.get(key)
    if got is None:
        got = _seen[key] = payload_sha256(mm)
    if got != info.get("sha256"):
        raise StoreError(f"{path}: its sha256 differs from the manifest's (the payload changed "
                         "after the shard was written, or the file is another run's); the file "
                         "is damaged: `rjepa-latent verify RUN` lists every damaged shard, "
                         "`rjepa-latent extract ... --repair` redoes them")


def hash_file(path: Path) -> str:
    """sha256 of a file, streamed in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_offsets(path: Path, arrays: dict[str, np.ndarray], layout: list, damaged: str = "") -> None:
    """Each tensor's data_offsets must be the ones the layout gives (the tensors
    back to back, in file order, from the payload's start): two tensors of one
    shape with their offsets swapped would otherwise serve each other's values."""
    buf = arrays[layout[0][0]]
    while isinstance(buf, np.ndarray):
        buf = buf.base
    if buf is None:
        return   # not views of a file's buffer
    start = np.frombuffer(buf, np.uint8, count=0).__array_interface__["data"][0]
    (n,) = struct.unpack("<Q", bytes(memoryview(buf)[:8]))
    offset = 0
    for name, _, _ in layout:
        a = arrays[name]
        got = a.__array_interface__["data"][0] - start - 8 - n
        if got != offset:
            raise StoreError(f"{path}: tensor {name!r} starts at payload byte {got}, the layout the "
                             f"manifest implies puts it at {offset} (its data_offsets were "
                             f"edited){damaged}")
        offset += a.nbytes


# ------------------------------------------------------------ the manifest and the journal

class ManifestEdited(StoreError):
    """manifest.json is not what rjepa-latent wrote: its content hash differs, or
    its shard list or counts contradict each other."""


MANIFEST_SHA256 = "manifest_sha256"   # manifest.json's hash of its own content (all but this key)


# configuration fields a grown run changes (its extent): left out of `config_digest`
CONFIG_EXTENT = ("inputs", "dataset_sha256", "limit")


def _canonical_sha256(obj: dict, leave_out: Iterable[str]) -> str:
    body = {k: v for k, v in obj.items() if k not in leave_out}   # sorted keys: order never matters
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                                     allow_nan=False).encode("utf-8")).hexdigest()


def config_digest(config: dict) -> str:
    """sha256 of a run's configuration without its extent: every journal entry
    carries it (config_sha256), so the journal confirms or refutes a manifest's
    configuration."""
    return _canonical_sha256(config, CONFIG_EXTENT)


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's content (canonical JSON of every key but the hash)."""
    return _canonical_sha256(manifest, (MANIFEST_SHA256,))


def sealed(manifest: dict) -> dict:
    """The manifest as written: its content and the hash of it."""
    return {**manifest, MANIFEST_SHA256: manifest_digest(manifest)}


_EDITED = ("; manifest.json is damaged or was edited after rjepa-latent wrote it, so nothing is "
           "served or resumed from it. `rjepa-latent extract ... --repair` with the run's own options "
           "rebuilds it from the shards' journal entries (the source of truth); otherwise restore it")


def check_manifest(path: Path, m: dict, format_version: int) -> None:
    """Raise ManifestEdited unless a format-2 manifest's shard list and counts agree
    with each other (shard k holds records [k*S, min((k+1)*S, N)], indices 0..n-1,
    the totals their sums) and, when it carries one, with its content hash."""
    h = m.get(MANIFEST_SHA256)
    if h is not None and h != manifest_digest(m):
        raise ManifestEdited(f"{path}: its content does not match its {MANIFEST_SHA256}{_EDITED}")
    if m.get("format_version") != format_version or not m.get("complete"):
        return
    try:
        n, size, shards = m["num_records"], int(m["config"]["shard_size"]), m["shards"]
        want = [[k * size, min((k + 1) * size, n)] for k in range((n + size - 1) // size)]
        got = [[int(r) for r in s["records"]] for s in shards]
        idx = [s["index"] for s in shards]
        totals = m.get("totals") or {}
        sums = {key: sum(s[key] for s in shards) for key in ("items", "steps", "tokens")}
        sums["errors"] = sum(len(s["errors"]) for s in shards)
        digest = config_digest(m["config"])
        ok = (m["num_shards"] == len(want) and idx == list(range(len(want))) and got == want
              and all(totals.get(k, v) == v for k, v in sums.items())
              and all(s.get("config_sha256", digest) == digest for s in shards))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        ok = False
    if not ok:
        raise ManifestEdited(f"{path}: its configuration, shard list, num_records, num_shards or "
                             f"totals do not agree with each other{_EDITED}")


# ------------------------------------------------------------ notes of checked files

def _notes_dir() -> Path | None:
    root = os.environ.get(CACHE_ENV)
    if not root:
        home = os.path.expanduser("~")
        base = os.environ.get("XDG_CACHE_HOME") or (None if home == "~" else os.path.join(home, ".cache"))
        if base is None:
            return None   # no home: no notes (a resume hashes what it trusts)
        root = os.path.join(base, "rjepa_latent")
    return Path(root) / "checked"


def _note_path(path: Path) -> Path | None:
    d = _notes_dir()
    if d is None:
        return None
    return d / (hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:40]
                + ".json")


def note_checked(path: Path, sha256: str) -> None:
    """Note that `path`, as it is now, has `sha256` (its writer computed it, or a
    resume hashed it). Best effort: a note that cannot be written costs a hash later."""
    try:
        key = file_identity(path, os.stat(path))
        _seen[key] = sha256
        note = _note_path(path)
        if note is None:
            return
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_name(f".{note.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"identity": list(key), "sha256": sha256}))
        os.replace(tmp, note)
    except (OSError, TypeError, ValueError):
        pass


def _noted(path: Path, key: tuple) -> str | None:
    if key in _seen:
        return _seen[key]
    note_path = _note_path(path)
    if note_path is None:
        return None
    try:
        note = json.loads(note_path.read_text())
        if tuple(note["identity"]) == key and isinstance(note["sha256"], str):
            return note["sha256"]
    except (OSError, TypeError, ValueError, KeyError, AttributeError):
        pass
    return None


def unchecked_payloads(out: Path, entries: dict[int, dict], skip=()) -> dict[str, str]:
    """{file: problem} for the committed .safetensors files of `entries` whose sha256
    differs from their entry's; a file is hashed only when no note says it was
    checked since its last change (`skip`: files already found damaged)."""
    problems = {}
    for k in sorted(entries):
        for fname, info in entries[k]["files"].items():
            if not fname.endswith(".safetensors") or fname in skip:
                continue
            p = out / fname
            try:
                key = file_identity(p, os.stat(p))
            except OSError:
                continue   # missing: the header check names it
            if _noted(p, key) == info.get("sha256"):
                continue
            got = hash_file(p)
            if got != info.get("sha256"):
                problems[fname] = "sha256 differs from the manifest's (its payload changed)"
            else:
                note_checked(p, got)
    return problems


# ------------------------------------------------------------ strays

def stray_files(out: Path, keep: Iterable[int], num_shards: int | None = None) -> dict[str, str]:
    """{file: why} of the shard files (.safetensors, .jsonl, journal .json) in `out`
    that are not the run's: of a shard not in `keep` (a finished run's listed
    shards), or at or beyond `num_shards` (a run whose record count is known)."""
    keep = set(keep)
    found = {}
    for p in sorted(out.iterdir()):
        m = _SHARD_FILE.match(p.name)
        if not m:
            continue
        k = int(m.group(1))
        if num_shards is not None and k >= num_shards:
            found[p.name] = (f"a stray: shard {k} lies beyond the run's {num_shards} shard(s); "
                             f"`rjepa-latent extract ... --repair` moves it into {QUARANTINE}/")
        elif k not in keep:
            found[p.name] = (f"a stray: the finished run does not hold shard {k}; "
                             f"`rjepa-latent extract ... --repair` moves it into {QUARANTINE}/")
    return found




def quarantine(out: Path, files: Iterable[str]) -> list[str]:
    """Move `files` of `out` into out/quarantine/ (a name taken there gets a
    numbered suffix); returns where each went, relative to `out`."""
    moved = []
    qdir = out / QUARANTINE
    for name in sorted(files):
        src = out / name
        if not src.is_file():
            continue
        qdir.mkdir(exist_ok=True)
        dst, n = qdir / name, 0
        while dst.exists():
            n += 1
            dst = qdir / f"{name}.{n}"
        os.replace(src, dst)
        moved.append(str(dst.relative_to(out)))
    for d in (out, qdir) if moved else ():   # the moves survive a crash
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return moved

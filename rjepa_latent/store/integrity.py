"""Payload checks of a run directory's shards: what makes a reader and a resume
trust a shard's bytes.

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
- Strays: shard files a run does not hold (another run's, a copy) are
  reported by verify and by a resume, and `extract --repair` moves them into
  quarantine/ inside the run directory, in a partial run (when it finishes
  and so knows its shard count) as in a finished one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import StoreError
from .files import QUARANTINE, _fsync_dir, file_sha256

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


def payload_sha256(buf) -> str:
    """sha256 of a mapped file (hashlib releases the GIL over large buffers)."""
    return hashlib.sha256(buf).hexdigest()


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
            got = file_sha256(p)
            if got != info.get("sha256"):
                problems[fname] = "sha256 differs from the manifest's (its payload changed)"
            else:
                note_checked(p, got)
    return problems


# ------------------------------------------------------------ strays



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
    if moved:
        _fsync_dir(out)
        _fsync_dir(qdir)
    return moved

"""Writing a run directory: `commit_shard` (a shard's files, then its journal
entry), `check_run_config` (a resume must match) and `RunStore`, the run's
lock, manifest and errors."""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ..engine.model import TOKEN_POOLING
from ..errors import StoreError
from .token_rows import row_norms, site_norms, stored_f32, token_key_tensors
from .integrity import (ManifestEdited, config_digest, note_checked, quarantine, sealed, stray_files,
                        unchecked_payloads)
from .files import (ENGINE_IDENTITY, ERRORS, FORMAT, FORMAT_VERSION, MANIFEST, STORE_DTYPES, _JOURNAL,
                    _OWN_FILE, _PART_MANIFEST, _TMP, _json_bytes, _jsonl_bytes, _load_json, _sidecar_row,
                    _verify, atomic_write, config_differences, damage_report, journal_bytes, journal_name,
                    latents_tensor, read_journal_lenient, run_poolings, run_sites, safetensors_chunks,
                    site_tensor, site_width, token_steps_of, write_tag)


def commit_shard(out: Path, config: dict, index: int, records: tuple[int, int], items: list,
                 latents: list[np.ndarray], errors: list[dict], kernel: str | None = None,
                 token_rows: list[dict] | None = None) -> dict:
    """Write shard `index` and commit it: its .safetensors and .jsonl, then its
    journal entry (each atomic and fsynced), so whatever has an entry is complete.
    Needs no lock: shards are disjoint files and temporaries carry a unique tag
    (`write_tag`), so processes may commit different shards into one directory at
    once. Items in input order, latents already in the stored dtype: per item
    [n_layers, n_rows, hidden], or [n_poolings, n_layers, n_rows, hidden] for a
    run of several poolings; rows are steps, or tokens for a per-token run. A run
    of activation sites (config "sites") takes per item a dict: site ->
    [n_poolings, n_rows, width], stored as one tensor per site and pooling.
    `token_rows` (per-token runs with a token selection): per item the kept
    `positions`, their `norms` [n_layers or n_sites, rows] and (with outliers)
    `outliers`."""
    tag = write_tag(index)
    name = f"shard-{index:05d}"
    nl, d = len(config["layers"]), config["hidden_size"]
    st_dtype, np_dtype = STORE_DTYPES[config["dtype"]]
    poolings = run_poolings(config)
    per_token = poolings == [TOKEN_POOLING]
    sites = run_sites(config)
    keyed = per_token and "token_selection" in config
    if keyed and token_rows is None:   # every token, its norm from the stored values
        token_rows = [{"positions": np.arange(len(it.ids), dtype=np.int32),
                       "norms": site_norms({s: stored_f32(lat[s], config["dtype"]) for s in sites}) if sites
                       else row_norms(stored_f32(lat, config["dtype"]))} for it, lat in zip(items, latents)]
    n_rows = [(len(token_rows[i]["positions"]) if keyed else len(it.ids)) if per_token else len(it.spans)
              for i, it in enumerate(items)]
    if sites:
        _check_sites(config, items, latents, len(poolings), n_rows)
    lats = [] if sites else [lat[None] if lat.ndim == 3 else lat for lat in latents]   # [P, nl, rows, d]
    for it, lat, rows_want in zip(items, lats, n_rows):
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
        np.cumsum([len(r["positions"]) for r in token_rows] if keyed else [len(it.ids) for it in items],
                  out=tok_offsets[1:])
        token_steps = (np.concatenate([token_steps_of(it.spans, len(it.ids)) for it in items])
                       if items else np.zeros(0, np.int32))
        if keyed:
            tensors += token_key_tensors(config, items, token_rows)
            token_steps = (np.concatenate([token_steps_of(it.spans, len(it.ids))[r["positions"]]
                                           for it, r in zip(items, token_rows)]) if items else token_steps)
        tensors[2:2] = [("token_offsets", "I64", tok_offsets), ("token_steps", "I32", token_steps)]
    for q, p in enumerate(poolings):
        for s in sites:
            arr = (np.concatenate([x[s][q] for x in latents], axis=0) if latents else
                   np.zeros((0, site_width(config, s)), np_dtype)).astype(np_dtype, copy=False)
            tensors.append((site_tensor(poolings, p, s), st_dtype, arr))
        if sites:
            continue
        lat = (np.concatenate([x[q] for x in lats], axis=1) if lats else
               np.zeros((nl, 0, d), np_dtype)).astype(np_dtype, copy=False)
        tensors.append((latents_tensor(poolings, p), st_dtype, lat))
    rows = [_sidecar_row(it, int(c)) for it, c in zip(items, steps)]   # checked before any write
    st = atomic_write(out / f"{name}.safetensors", safetensors_chunks(
        tensors, {"poolings": ",".join(poolings), **({"sites": ",".join(sites)} if sites else {})}),
        tag)
    js = atomic_write(out / f"{name}.jsonl", [_jsonl_bytes(rows)], tag)
    entry = {"index": index, "records": [int(records[0]), int(records[1])], "items": len(items),
             "steps": int(offsets[-1]),
             "tokens": int(tok_offsets[-1]) if per_token else int(sum(len(it.ids) for it in items)),
             "errors": errors, "files": {f"{name}.safetensors": st, f"{name}.jsonl": js}}
    if "outliers" in config and token_rows is not None:
        entry["outliers"] = int(sum(r.get("marked", 0) for r in token_rows))
    if kernel is not None:
        entry["kernel"] = kernel  # the kernel identity that computed this shard
    entry["config_sha256"] = config_digest(config)   # the journal confirms the run's configuration
    atomic_write(out / journal_name(index), [journal_bytes(entry)], tag)
    note_checked(out / f"{name}.safetensors", st["sha256"])   # a resume need not hash it again
    return entry


def _check_sites(config: dict, items: list, latents: list, n_poolings: int, n_rows: list[int]) -> None:
    for it, lat, rows_want in zip(items, latents, n_rows):
        for s in run_sites(config):
            want = (n_poolings, rows_want, site_width(config, s))
            got = tuple(lat[s].shape) if isinstance(lat, dict) and s in lat else None
            if got != want:
                raise StoreError(f"item {it.id!r}: site {s} of shape {got}, the run stores {want} "
                                 f"(poolings, rows, width)")


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
                 allow_kernel_change: bool = False, extent: Iterable[str] = (), grows=None,
                 mend: bool = False):
        self.out = Path(out)
        self.part = part
        self.kernel = config.get("engine_kernel")  # what this process computes with
        self._check_directory()
        self.config = config
        self.grown = False
        self.entries: dict[int, dict] = {}
        self.bad_entries: dict[str, str] = {}
        self.edited: str | None = None   # why manifest.json is not trusted (rebuilt from the journal)
        self.mend = mend                 # --repair: mend the manifest, quarantine strays
        self.strays: dict[str, str] = {}
        self.quarantined: list[str] = []
        self._stored: dict | None = None
        self._lock_fd = None
        self.num_records: int | None = None
        if not (self.out / MANIFEST).is_file():
            old = [p.name for p in self.out.iterdir() if _PART_MANIFEST.match(p.name)] \
                if self.out.is_dir() else []
            if old:
                raise StoreError(_OLD_FORMAT.format(out=self.out))
            return
        try:
            m = _load_json(self.out / MANIFEST)
        except ManifestEdited as e:
            if not mend:
                raise
            m, self.edited = _load_json(self.out / MANIFEST, check=False), str(e)
        if m["format_version"] != FORMAT_VERSION:
            raise StoreError(_OLD_FORMAT.format(out=self.out))
        stored = m["config"]
        try:
            check_run_config(self.out, stored, config, allow_kernel_change, extent)
        except StoreError as e:
            if not self.edited:
                raise
            entries, bad = read_journal_lenient(self.out, config)
            if (bad or not entries or any("config_sha256" not in x for x in entries.values())
                    or any(stored.get(k) != config.get(k) for k in extent)):
                raise StoreError(f"{self.edited.split('; ')[0]}, and its configuration is not this "
                                 "command's nor confirmed by the shards' journal entries, so it "
                                 f"cannot be rebuilt; nothing was changed.\n{e}") from None
            stored = m["config"] = {**config}   # every entry was computed under this command's
        changed = [k for k in extent if stored.get(k) != config.get(k)]
        if changed and self.edited:   # the journal does not record the data: nothing confirms it
            raise StoreError(f"{self.edited.split('; ')[0]}, and the data it names is not this "
                             "command's, so it cannot be rebuilt; nothing was changed. Differences "
                             "of its configuration:\n" + "\n".join(config_differences(
                                 {k: stored.get(k) for k in changed}, {k: config.get(k) for k in changed})))
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
        if self.edited:   # the configuration is confirmed by the command: the shards come from the journal
            self._stored = {**m, "complete": False}
            self._read_journal()
        elif m.get("complete"):
            self.entries = {s["index"]: s for s in m["shards"]}
            if self.grown:   # finished over less data: not complete any more
                self._stored = {**m, "complete": False}
        else:
            self._read_journal()

    def _read_journal(self) -> None:
        """The committed entries; an unreadable entry file is damage (`bad_entries`),
        which --repair redoes like any damaged shard."""
        entries, bad = read_journal_lenient(self.out, self.config)
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
        problems = {**self.bad_entries, **_verify(self.out, self.manifests, full, progress)}
        if not full:   # trust a payload only when hashed since its commit
            problems.update(unchecked_payloads(self.out, self.entries, skip=problems))
        self.strays = stray_files(self.out, self.entries) if self.is_complete() else {}
        return {**problems, **self.strays}

    def quarantine_strays(self, strays: Iterable[str]) -> list[str]:
        """Move shard files that are not this run's into quarantine/ (--repair)."""
        for name in strays:
            if (m := _JOURNAL.match(name)):
                self.entries.pop(int(m.group(1)), None)   # a committed-looking stray of a partial run
        return quarantine(self.out, strays)

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
        strays = stray_files(self.out, range(n), n)
        if strays:   # files of shards beyond the inputs' records: not this run's
            if not self.mend:
                raise StoreError(f"{self.out}: {len(strays)} shard file(s) beyond the {num_records} "
                                 "records of the inputs, not written by this run; the run is not "
                                 "finished:\n" + damage_report(self.out, strays) + "\nRun the same "
                                 "command with --repair to move them into quarantine/")
            self.quarantined += self.quarantine_strays(strays)
        listed = [self.entries[k] for k in range(n)]
        final = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config,
                 "num_records": num_records, "num_shards": n, "complete": True,
                 "totals": {key: sum(e[key] for e in listed) for key in ("items", "steps", "tokens")}
                 | {"errors": sum(len(e["errors"]) for e in listed)}
                 | ({"outliers": sum(e.get("outliers", 0) for e in listed)} if "outliers" in self.config else {}),
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
        atomic_write(self.out / MANIFEST, [_json_bytes(sealed(manifest))], write_tag("manifest"))
        self._stored = manifest


_OLD_FORMAT = ("{out} holds a run of format 1 (one manifest rewritten per shard); this rjepa-latent "
               "writes format 2 (a journal file per shard) and does not resume or grow format 1 "
               "runs. Its finished shards stay readable (open_latents, info, verify, export); to "
               "finish it, extract into a new --out (or delete this directory and start again).")


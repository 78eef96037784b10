"""`RunDriver`: owns a run directory (lock, start and final manifest) and hands
out pending shards lazily; one process, `--part` workers and Ray use it."""
from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..engine.plan import part_shards
from ..errors import StoreError
from ..inputs.data import ErrorRecord
from ..inputs.sources import PARQUET_SUFFIXES
from ..store.files import ERRORS, counted, damage_report, error_kind, stored_config
from ..store.write import RunStore
from .spec import AUTO, RunSpec


# fields of the configuration that say how far a run reaches: a stored run may be
# continued with other values of these when the new run extends it (`_grows`)
EXTENT = ("inputs", "dataset_sha256", "limit")


class RunDriver:
    """The driver's side of one run: opens (or creates) the run directory, refusing
    a clash before anything is written; holds the directory lock; reads the
    records lazily and hands out the pending shards; writes the final manifest
    (`finish`). The shards themselves are done by `ShardWorker`s, in this process
    or in others (`--part` workers, Ray actors), committing into the directory.

    Shard k covers input records [k * shard_size, (k + 1) * shard_size); a
    committed shard is skipped (not tokenized) when its record range is exactly
    the one the inputs give now (a partial last shard of a grown run is redone)."""

    def __init__(self, spec: RunSpec, config: dict, out: str | os.PathLike, progress: bool = False):
        self.spec, self.out, self.progress = spec, Path(out), progress
        if self.out.exists() and not self.out.is_dir():
            raise StoreError(f"--out {self.out} exists and is not a directory")
        requested = dict(config)
        stored = _stored_config(self.out)
        if stored is not None and spec.shard_size == AUTO and "shard_size" in stored:
            requested["shard_size"] = stored["shard_size"]   # resolved once, when the run began
        self.store = RunStore(self.out, requested, spec.part, allow_kernel_change=spec.allow_kernel_change,
                              extent=EXTENT, grows=self._grows, mend=spec.repair)
        self.config = self.store.config
        self.shard_size: int = self.config["shard_size"]
        self.num_records: int | None = None
        self.unknown_ids: list[str] = []
        self.problems: dict[str, str] = {}
        self.repaired: list[int] = []
        self.started = False
        self.kept = (0, 0)   # (shards, records) a resume keeps

    # -- opening

    def check(self) -> None:
        """Check the committed shards (with `repair`: every sha256, and forget the
        damaged ones so they are redone); raise StoreError naming damage otherwise."""
        problems = self.store.check_committed(full=self.spec.repair, progress=self.progress)
        if self.spec.repair and self.store.strays:   # not the run's files: moved aside, not redone
            self.store.quarantined += self.store.quarantine_strays(self.store.strays)
            problems = {f: why for f, why in problems.items() if f not in self.store.strays}
        damaged = {f: why for f, why in problems.items() if f != ERRORS}   # errors.jsonl is derived
        if damaged and not self.spec.repair:
            raise StoreError(
                f"{self.out}: {len(damaged)} committed file(s) are damaged or missing, so the run "
                f"is not complete and nothing was changed:\n{damage_report(self.out, damaged)}"
                "\nRun the same command with --repair to redo exactly those shards "
                f"(`rjepa-latent verify {self.out}` checks every sha256)")
        self.problems = problems
        self.repaired = self.store.forget(damaged)
        if self.store.edited:
            print(f"rjepa-latent extract: --repair: {self.store.edited.split('; ')[0]}; rebuilding it "
                  "from the shards' journal entries", file=sys.stderr)

    @property
    def complete(self) -> bool:
        """A finished run with nothing to mend: a rerun has nothing to do."""
        return self.store.is_complete() and not self.problems

    def _grows(self, stored: dict, requested: dict) -> bool:
        """Whether the requested extent (inputs, limit) extends the stored one: the
        stored inputs are a prefix of the new ones (equal files, the last one
        possibly appended to at a line end, more files after), the limit no lower."""
        s_lim, r_lim = stored.get("limit"), requested.get("limit")
        if s_lim is None and r_lim is not None or (s_lim is not None and r_lim is not None and r_lim < s_lim):
            return False
        old, new = stored.get("inputs") or [], requested.get("inputs") or []
        if old == new:
            return True
        if len(new) < len(old) or not isinstance(self.spec.inputs, tuple):
            return False
        for i, (a, b) in enumerate(zip(old, new)):
            if a == b:
                continue
            if i != len(old) - 1 or a.get("name") != b.get("name"):
                return False
            return _appended(Path(self.spec.inputs[i]), a)
        return True

    # -- shards

    def shard_range(self, k: int, num_records: int | None = None) -> tuple[int, int]:
        n = num_records if num_records is not None else self.num_records
        end = (k + 1) * self.shard_size
        return k * self.shard_size, end if n is None else min(end, n)

    def _chunks(self) -> Iterator[tuple[int, tuple[int, int], list]]:
        """Every shard of the inputs in order, (k, (start, end), records), records
        read lazily (at most one shard's worth held); sets num_records at the end."""
        reader = self.spec.records()
        limit = self.spec.limit
        k, buf, n = 0, [], 0
        for rec in reader:
            if limit is not None and n >= limit:
                break
            buf.append(rec)
            n += 1
            if len(buf) == self.shard_size:
                yield k, (k * self.shard_size, n), buf
                k, buf = k + 1, []
        self.num_records = n
        if buf:
            yield k, (k * self.shard_size, n), buf

    def _kept(self, k: int, rng: tuple[int, int]) -> bool:
        e = self.store.entries.get(k)
        return e is not None and list(e["records"]) == [rng[0], rng[1]]

    def pending(self) -> Iterator[tuple[int, tuple[int, int], list]]:
        """The shards of this worker (`part`) still to do, lazily: (k, (start, end),
        records) with records as `ShardWorker.run_shard` takes them (an --ids run:
        only the sample's). The first records are checked first (no records:
        NothingExtracted, nothing written; the first EARLY_STOP_RECORDS all errors:
        NothingExtracted, their reasons in errors.jsonl); then the directory is
        created and locked and the start manifest written."""
        chunks = self._chunks()
        head: list = []
        for item in chunks:   # read up to EARLY_STOP_RECORDS records before anything is written
            head.append(item)
            if sum(len(c[2]) for c in head) >= EARLY_STOP_RECORDS:
                break
        first = [r for c in head for r in c[2]][:EARLY_STOP_RECORDS]
        if not first:
            raise NothingExtracted(f"nothing was extracted: the inputs hold no records "
                                   f"({', '.join(_source_names(self.spec))}); nothing was written")
        if not self.store.entries and all(isinstance(r, ErrorRecord) for r in first):
            _early_stop(self.store, first, self.spec.format)   # raises: nothing but errors so far
        self.start()
        i, n = self.spec.part
        wanted = set(self.spec.ids) if self.spec.ids else None
        found: set[str] = set()
        for k, rng, recs in itertools.chain(head, chunks):
            if wanted is not None:
                recs = [r for r in recs if r.id in wanted]
                found.update(r.id for r in recs)
            if k % n != i or self._kept(k, rng):
                continue
            yield k, rng, recs
        if wanted is not None:
            self.unknown_ids = [x for x in self.spec.ids if x not in found]

    def start(self) -> None:
        """Create and lock the directory, write the start manifest (once)."""
        if not self.started:
            self.store.prepare()
            self.started = True
            i, n = self.spec.part
            kept = [e for k, e in self.store.entries.items() if k % n == i]
            self.kept = (len(kept), sum(e["records"][1] - e["records"][0] for e in kept))
            if kept:
                print(f"rjepa-latent extract: resuming {self.out}: keeping "
                      f"{counted(len(kept), 'finished shard')} ({counted(self.kept[1], 'record')}); "
                      "the shards after them are read (finished "
                      "ones skipped without tokenizing) and the rest computed"
                      + (" (the dataset grew: a partial last shard is redone)" if self.store.grown else ""),
                      file=sys.stderr)

    def say_resumed(self, shards: int, records: int) -> None:
        """After a resume: what was kept and what remained (now done)."""
        if self.kept[0]:
            print(f"rjepa-latent extract: resumed {self.out}: kept "
                  f"{counted(self.kept[0], 'finished shard')} ({counted(self.kept[1], 'record')}); "
                  f"{counted(shards, 'shard')} ({counted(records, 'record')}) remained and "
                  "are done now", file=sys.stderr)

    def say_unknown_ids(self) -> None:
        """After the records were read: the --ids that no input holds."""
        if self.unknown_ids:
            shown = ", ".join(map(repr, self.unknown_ids[:5]))
            print(f"rjepa-latent extract: {len(self.unknown_ids)} of the {len(self.spec.ids)} --ids are "
                  f"not in the inputs: {shown}{' ...' if len(self.unknown_ids) > 5 else ''}",
                  file=sys.stderr)

    def note(self, entry: dict) -> None:
        """A shard committed (by any worker)."""
        self.store.note(entry)

    def finish(self) -> bool:
        """Write the final manifest.json / errors.jsonl once every shard is
        committed (idempotent); returns whether the run is complete. Needs the
        record count: call after `pending` was read to its end."""
        if self.num_records is None:
            raise RuntimeError("finish() before the records were read to their end")
        done = self.store.finish(self.num_records)
        n = -(-self.num_records // self.shard_size)
        self.repaired = [k for k in self.repaired if k < n]   # the others were strays, quarantined
        return done

    def close(self) -> None:
        self.store.close()

    def summary(self, written: int, compute_s: float, wall_s: float, tokens_run: int,
                noop: bool = False) -> dict:
        part = self.spec.part
        if self.num_records is None:
            self.num_records = self.store.stored_num_records()
        entries = self.store.entries
        if self.num_records is not None:
            n_shards = -(-self.num_records // self.shard_size)
            mine = [entries[k] for k in part_shards(n_shards, part) if k in entries]
        else:
            mine = [e for k, e in sorted(entries.items()) if k % part[1] == part[0]]
        kinds = error_kinds([e for s in mine for e in s["errors"]])
        return {
            "out": str(self.out), "part": f"{part[0]}/{part[1]}", "noop": noop,
            "complete": self.store.is_complete(),
            "shards_written": written, "shards_total": len(mine),
            "items": sum(s["items"] for s in mine), "steps": sum(s["steps"] for s in mine),
            "errors": sum(len(s["errors"]) for s in mine), "tokens": sum(s["tokens"] for s in mine),
            "tokens_this_run": tokens_run, "wall_s": wall_s, "compute_s": compute_s,
            "tokens_per_s": tokens_run / wall_s if wall_s > 0 else 0.0,
            "engine_tokens_per_s": tokens_run / compute_s if compute_s > 0 else 0.0,
            "records": self.num_records, "error_kinds": dict(kinds.most_common()),
            "errors_file": str(self.out / ERRORS), "shard_size": self.shard_size,
            "error_example": _example(mine),
            "grown": self.store.grown, "unknown_ids": list(self.unknown_ids),
            **({"outliers": sum(s.get("outliers", 0) for s in mine)} if "outliers" in self.config else {}),
            "quarantined": list(self.store.quarantined),
        }


def _source_names(spec: RunSpec) -> list[str]:
    return [Path(p).name for p in spec.inputs] if isinstance(spec.inputs, tuple) else ["dataset"]


def _stored_config(out: Path) -> dict | None:
    return stored_config(out)   # RunStore reports an unreadable manifest


def _appended(path: Path, old: dict) -> bool:
    """Whether `path` (now) starts with exactly the bytes `old` fingerprinted and
    they ended at a line end of a JSON Lines file (records were appended)."""
    if path.name.lower().endswith((".json", ".gz") + PARQUET_SUFFIXES):
        return False
    size = int(old["bytes"])
    h = hashlib.sha256()
    last = b""
    with open(path, "rb") as f:
        left = size
        while left:
            block = f.read(min(left, 1 << 22))
            if not block:
                return False
            h.update(block)
            last = block[-1:]
            left -= len(block)
    return h.hexdigest() == old["sha256"] and (size == 0 or last == b"\n")


EARLY_STOP_RECORDS = 1000   # all errors among the first this many records: stop (wrong file / --format?)


class NothingExtracted(ValueError):
    """The inputs hold no record, or their first records are all errors: the run
    stops before any shard."""


def _early_stop(store: RunStore, records: list, fmt: str) -> None:
    """Writes the errors of the first records to errors.jsonl (under the
    directory lock, strict JSON; nothing else) and raises NothingExtracted
    naming their most common reasons."""
    errors = [r.to_json() for r in records]
    store.out.mkdir(parents=True, exist_ok=True)
    store._lock_directory(store.part[1] == 1)
    try:
        store.write_errors(errors)
    finally:
        store.close()
    kinds = "; ".join(f"{n} x {k}" for k, n in error_kinds(errors).most_common(3))
    sources = ", ".join(dict.fromkeys(r.source for r in records))
    what = f"all {len(records)} records" if len(records) < EARLY_STOP_RECORDS else \
        f"the first {len(records)} records"
    first = records[0]
    raise NothingExtracted(
        f"{what} of {sources} are errors ({kinds}); stopped before extracting anything: is this the "
        f"right file, and the right --format (now {fmt})? The first in full: {first.source} line "
        f"{first.line}: {first.reason}. Each record's reason is in {store.out / ERRORS}")


def _example(entries: list[dict]) -> str | None:
    """The first error of these shards in full, with where it is ('data.jsonl line 3: ...')."""
    for s in entries:
        for e in s["errors"]:
            return f"{e.get('source')} line {e.get('line')}: {e.get('reason')}"
    return None


def error_kinds(errors: list[dict]) -> Counter:
    return Counter(error_kind(e["reason"]) for e in errors)


def _strict(summary: dict, strict: bool, out: Any) -> dict:
    if strict and summary["errors"]:
        raise ValueError(f"{summary['errors']} records could not be processed (strict); "
                         f"see {Path(out) / 'errors.jsonl'}")
    return summary

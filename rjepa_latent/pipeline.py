"""`extract_dataset` and the `rjepa-latent extract` subcommand: records ->
tokens -> planned batches -> engine -> shards, resumable, with progress.

Design choices:
- The shard seam (docs/architecture.md): `run_spec` checks the options once
  (a picklable `RunSpec`), `run_config` adds what the model decides,
  `RunDriver` owns the directory (lock, start and final manifest) and hands
  out pending shards lazily, `ShardWorker` does one shard and commits it (no
  lock). One process, `--part` workers and Ray actors all use these pieces.
- Records are streamed: read lazily in input order, one shard's worth held at
  a time (duplicate ids are checked against an on-disk index, data.IdIndex);
  shard k is records [k*S, (k+1)*S), so boundaries need no record count.
  In one process, three threads, one job each, joined by bounded queues:
  a producer reads, tokenizes, checks and plans the next shards (`encode_batch`
  runs in Rust without the GIL); the calling thread runs the engine
  (`Model.run_batch`: the core releases the GIL); a writer thread converts,
  checksums, writes, fsyncs and commits shards. So tokenization and disk I/O
  overlap with compute, and end-to-end tokens/s stays close to the bare engine's.
- The seam to the engine is the Model's (see model.py): every tokenized
  record goes through `Model.check` in the tokenizer thread (a record the
  engine cannot take becomes an error line, it never aborts the run), the
  shard is packed by `plan.plan_batches` (the one packer), and the calling
  thread gives each planned batch to `Model.run_batch`: one engine call per
  planned batch, exactly that batch.
- The caller's Model is left as it was: a batch budget or a record larger
  than its workspace grows the (CPU) workspace for the run or the batch only
  (`Model.workspace_for`); the run's own model is closed at the end.
- The configuration (model fingerprint, layers, pooling, stored dtype,
  template, format, segmentation, annotation stripping, chat options and the
  chat template's hash, longest text, tokenizer, input files (or a Dataset's
  row hash), shard size, and the
  engine identity: backend, compute dtype, kernel, package version) is
  checked against the run directory before anything is written; a finished
  run returns at once. `allow_kernel_change` lets a resume continue under
  another kernel identity; each shard's entry records the kernel it was
  computed with.
- Throughput of each full batch is compared with the running median of the
  previous ones; a batch below half of it raises a `ThroughputWarning` that
  names the usual causes (memory pressure, offload, thermal throttling).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import statistics
import sys
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .data import (DEFAULT_STEP_REGEX, DEFAULT_STEP_SEPARATOR, DEFAULT_TEMPLATE, FORMATS, SEGMENT_RULES,
                   Chat, ErrorRecord, Record, Segmenter, Template, dataset_fingerprint, input_sources,
                   PARQUET_SUFFIXES, is_dataset, read_records)
from .errors import InputError, StoreError, TokenIdError
from .model import POOLINGS, TOKEN_POOLING, Model, resolve_poolings
from .plan import part_shards, plan_batches
from .store import (ERRORS, STORE_DTYPES, RunStore, check_run_config, commit_shard, convert_latents,
                    damage_report, error_kind, stored_config)
from .tokenize import Item, prepare_tokenizer, tokenize_records, tokenizer_hash

AUTO = "auto"                # shard_size: chosen from the data and the device (auto_shard_size)
DEFAULT_SHARD_SIZE = AUTO
EARLY_STOP_RECORDS = 1000   # all errors among the first this many records: stop (wrong file / --format?)


class ThroughputWarning(RuntimeWarning):
    """A batch ran at less than half the running median throughput."""


# ------------------------------------------------------------ options

def parse_part(part: Any) -> tuple[int, int]:
    """'i/n' or (i, n) -> (i, n) with 0 <= i < n."""
    if isinstance(part, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"part must look like i/n (e.g. 0/4), got {part!r}")
        part = (int(m.group(1)), int(m.group(2)))
    i, n = part
    if n <= 0 or not 0 <= i < n:
        raise ValueError(f"part must be i/n with 0 <= i < n, got {i}/{n}")
    return int(i), int(n)


def input_fingerprint(paths: Sequence[Path]) -> list[dict]:
    """Name, size and sha256 of each input file (the dataset's identity)."""
    out = []
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist or is not a file")
        try:  # the name goes into UTF-8 JSON files (manifest, shard metadata)
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"input file name {p.name!r} is not valid UTF-8; rename the file") from None
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out.append({"name": p.name, "bytes": p.stat().st_size, "sha256": h.hexdigest()})
    return out


# ------------------------------------------------------------ health

class ThroughputWatch:
    """Warns when a full batch runs below half the running median tokens/s."""

    def __init__(self, budget: int, window: int = 64, min_batches: int = 8):
        self.budget = budget
        self.rates: deque[float] = deque(maxlen=window)
        self.min_batches = min_batches
        self.quiet_until = 0
        self.batches = 0
        self.warnings = 0

    def record(self, tokens: int, seconds: float) -> None:
        self.batches += 1
        if tokens < self.budget // 2 or seconds <= 0:
            return  # small batches (a shard's tail) are slow by nature
        rate = tokens / seconds
        if len(self.rates) >= self.min_batches:
            median = statistics.median(self.rates)
            if rate < 0.5 * median and self.batches >= self.quiet_until:
                self.warnings += 1
                self.quiet_until = self.batches + 50  # at most one warning per 50 batches
                warnings.warn(
                    f"batch {self.batches} ran at {rate:,.0f} tokens/s, below half the running "
                    f"median ({median:,.0f} tokens/s); likely causes: memory pressure (swapping), "
                    "model weights offloaded or paged out, thermal throttling, or another process "
                    "using the device", ThroughputWarning, stacklevel=2)
        self.rates.append(rate)


# ------------------------------------------------------------ threads

class _Worker(threading.Thread):
    """A daemon thread that records its exception for the main thread."""

    def __init__(self, target, name: str):
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # re-raised in the main thread
            self.error = e


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, worker: _Worker) -> Any:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if worker.error is not None:
                raise worker.error
            if not worker.is_alive():
                raise RuntimeError(f"{worker.name} thread ended unexpectedly")


def _refusal(e: InputError) -> str:
    """The errors.jsonl reason of a tokenized record the engine cannot take."""
    hint = "; the tokenizer does not match the model" if isinstance(e, TokenIdError) else ""
    return f"the engine cannot take this record's tokens: {e}{hint}"


# ------------------------------------------------------------ the seam: spec, config, driver, worker

@dataclass(frozen=True)
class RunSpec:
    """Every validated option of one extraction run except the model (picklable:
    it travels to `--part` workers and Ray actors). Built by `run_spec`, the one
    place options are checked; `run_config(spec, m)` adds what the model decides.
    `inputs` are paths (str) or one `datasets.Dataset`; `fingerprint` their
    identity; `model_path` only locates a chat template (`chat`)."""
    inputs: Any
    fingerprint: tuple
    format: str = "auto"
    layers: tuple = (-2,)
    pooling: Any = "mean"           # a name, or a tuple of names
    dtype: str = "float32"          # the stored dtype
    template: str = DEFAULT_TEMPLATE
    step_separator: str = DEFAULT_STEP_SEPARATOR
    step_regex: str = DEFAULT_STEP_REGEX
    segment: str = "auto"
    strip_annotations: bool = False
    chat: bool = False
    chat_think: bool = False
    system: str | None = None
    model_path: str | None = None
    max_tokens: int | None = None
    max_batch_tokens: int | None = None
    shard_size: Any = AUTO          # records per shard, or "auto"
    limit: int | None = None
    ids: tuple | None = None        # the --ids sample, in file order
    part: tuple = (0, 1)
    allow_kernel_change: bool = False
    repair: bool = False

    @property
    def pooling_value(self) -> str | list[str]:
        """The pooling as the configuration stores it: a name, or a list of names."""
        return self.pooling if isinstance(self.pooling, str) else list(self.pooling)

    def reading(self) -> dict:
        """How records become texts: the segmenter, annotation stripping, the chat template."""
        return {"segment": Segmenter(self.segment, self.step_regex), "strip": self.strip_annotations,
                "chat": _chat(self.model_path, self.chat_think, self.system) if self.chat else None}

    def records(self) -> Iterator[Record | ErrorRecord]:
        """The inputs' records, read lazily, in order."""
        r = self.reading()
        return read_records(self.inputs, self.format, Template(self.template, self.step_separator),
                            self.step_regex, segment=r["segment"], strip_annotations=r["strip"],
                            chat=r["chat"])


@functools.lru_cache(maxsize=4)
def _chat(model_path: str | None, think: bool, system: str | None) -> Chat:
    if model_path is None:
        raise ValueError("chat needs the model's path (its chat template); give a checkpoint path "
                         "or a Model loaded from one")
    return Chat.for_model(model_path, think, system)


def _positive(name: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def read_ids(path: str | os.PathLike) -> tuple[str, ...]:
    """An --ids file: one id per line (blank lines skipped, each line's outer
    whitespace dropped), UTF-8; a repeated id is kept once."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise FileNotFoundError(f"--ids file {str(p)!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--ids file {str(p)!r} is not UTF-8 text (one id per line)") from None
    ids = tuple(dict.fromkeys(x.strip() for x in text.split("\n") if x.strip()))
    if not ids:
        raise ValueError(f"--ids file {str(p)!r} holds no id (one id per line)")
    return ids


def run_spec(inputs: Any, *, format: str = "auto", layers: Sequence[int] = (-2,),
             pooling: str | Sequence[str] = "mean", dtype: str = "float32", template: str | None = None,
             step_separator: str = DEFAULT_STEP_SEPARATOR, step_regex: str = DEFAULT_STEP_REGEX,
             max_tokens: int | None = None, max_batch_tokens: int | None = None,
             shard_size: int | str = AUTO, limit: int | None = None,
             ids: str | os.PathLike | Sequence[str] | None = None, part: Any = (0, 1),
             allow_kernel_change: bool = False, segment: str = "auto", strip_annotations: bool = False,
             chat: bool = False, chat_think: bool = False, system: str | None = None,
             repair: bool = False, model: Any = None) -> RunSpec:
    """Check every option of `extract_dataset` (except the model itself; `model`,
    a path or a Model, only locates a chat template) and return the RunSpec.
    Missing or unreadable inputs, a bad option, a model without a usable chat
    template with `chat`: refused here, before any model is loaded or anything written."""
    dataset = inputs if is_dataset(inputs) else None
    paths = None if dataset is not None else \
        [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if paths is not None and not paths:
        raise ValueError("inputs is empty: give at least one .jsonl, .json or .parquet file")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    names, _ = resolve_poolings(pooling)   # ValueError / TypeError naming the mistake
    pooling = names[0] if len(names) == 1 else tuple(names)   # one name is stored as a str
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if shard_size != AUTO:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
            raise ValueError(f"shard_size must be a positive int or 'auto', got {shard_size!r}")
    for name, v in (("max_tokens", max_tokens), ("max_batch_tokens", max_batch_tokens), ("limit", limit)):
        _positive(name, v)
    part = parse_part(part)
    if repair and part[1] != 1:
        raise ValueError("repair runs as a single run (part 0/1, the default), after every --part "
                         "worker stopped: it checks and redoes shards of all parts")
    chat = bool(chat or chat_think)
    if chat and template is not None:
        raise ValueError("template and chat exclude each other: with chat the model's chat template "
                         "builds the text")
    if system is not None and not chat:
        raise ValueError("system needs chat=True (--chat): it is a message of the chat template")
    tmpl = Template(template if template is not None else DEFAULT_TEMPLATE, step_separator)
    Segmenter(segment, step_regex)
    if ids is not None and not isinstance(ids, (str, os.PathLike)):
        ids = tuple(dict.fromkeys(str(x) for x in ids))
        if not ids:
            raise ValueError("ids is empty: give the ids of the records to extract")
    elif ids is not None:
        ids = read_ids(ids)
    source = dataset if dataset is not None else paths
    input_sources(source)  # missing files, unreadable Parquet: refused now
    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = os.fspath(model)
    elif isinstance(model, Model):
        model_path = model.path
    if chat:   # refused before the model is loaded
        _chat(model_path, bool(chat_think), system)
    fingerprint = [dataset_fingerprint(dataset)] if dataset is not None else input_fingerprint(paths)
    return RunSpec(
        inputs=dataset if dataset is not None else tuple(str(p) for p in paths),
        fingerprint=tuple(fingerprint), format=format, layers=tuple(int(x) for x in layers),
        pooling=pooling, dtype=dtype, template=tmpl.template, step_separator=step_separator,
        step_regex=step_regex, segment=segment, strip_annotations=bool(strip_annotations), chat=chat,
        chat_think=bool(chat_think), system=system, model_path=model_path, max_tokens=max_tokens,
        max_batch_tokens=max_batch_tokens, shard_size=shard_size, limit=limit, ids=ids, part=part,
        allow_kernel_change=bool(allow_kernel_change), repair=bool(repair))


def batch_budget(spec: RunSpec, m: Model) -> int:
    """The run's batch budget on `m` (a CUDA model's workspace is fixed at load)."""
    budget = spec.max_batch_tokens or m.max_batch_tokens
    if m.backend != "cpu" and budget > m.max_batch_tokens:
        raise ValueError(f"max_batch_tokens={budget} is more than the {m.max_batch_tokens} tokens "
                         f"of workspace this Model reserved on {m.device}; load the Model with "
                         f"max_batch_tokens={budget}, or pass a smaller one")
    return budget


def run_tokenizer(spec: RunSpec, m: Model):
    tok = prepare_tokenizer(m.tokenizer)
    return _TemplateTokens(tok) if spec.chat else tok


def run_config(spec: RunSpec, m: Model) -> dict:
    """The run's configuration (what identifies its bytes, engine identity
    included) from a spec and a loaded model; `shard_size` "auto" is resolved
    here (`auto_shard_size`); a resumed run keeps its stored one instead."""
    lays = m.resolve_layers(spec.layers)
    budget = batch_budget(spec, m)
    tok = run_tokenizer(spec, m)
    max_tokens = spec.max_tokens if spec.max_tokens is not None else m.config.get("max_position_embeddings")
    fingerprint = list(spec.fingerprint)
    shard_size = spec.shard_size if spec.shard_size != AUTO else auto_shard_size(spec, m, lays)
    tmpl = Template(spec.template, spec.step_separator)
    return {
        "model_fingerprint": m.fingerprint, "model_type": m.config.get("model_type"),
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "layers": lays,
        "pooling": spec.pooling_value, "dtype": spec.dtype, "format": spec.format, **tmpl.to_json(),
        "step_regex": spec.step_regex, "max_tokens": max_tokens, "tokenizer_sha256": tokenizer_hash(tok),
        "inputs": fingerprint,
        "dataset_sha256": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest(),
        "shard_size": shard_size, **engine_identity(m),
        # on CUDA a batch's composition changes bf16 bits (on the CPU it never
        # does): the budget that decides it is part of the run there
        **({"engine_batch_tokens": budget} if m.backend != "cpu" else {}),
        **_reading_config(spec.reading()),
        **({"limit": spec.limit} if spec.limit is not None else {}),
        **({"ids": {"count": len(spec.ids), "sha256": hashlib.sha256(
            "\n".join(spec.ids).encode("utf-8", "surrogatepass")).hexdigest()}} if spec.ids else {}),
    }


# the auto shard size: a conservative estimate of the engine's rate (FLOP/s) on
# a slow machine of each kind (this CPU engine reaches about 50 GFLOP/s on two
# Haswell cores; a GPU in bf16 some hundreds of TFLOP/s), and the seconds one
# shard should take at it, so a machine even 3x slower than the estimate still
# commits every record within about 30 s of computing it
SHARD_TARGET_S = 10.0
SLOW_FLOPS = {"cpu": 10e9, "cuda": 20e12}
AUTO_SAMPLE = 256          # records read to estimate the mean text length
SHARD_SIZE_RANGE = (10, 100_000)


def _round_down_125(n: int) -> int:
    """The largest of 1, 2, 5, 10, 20, 50, ... not above n (stable, readable sizes)."""
    best = 1
    for e in range(0, 12):
        for f in (1, 2, 5):
            if f * 10 ** e <= n:
                best = f * 10 ** e
    return best


def flops_per_token(m: Model, layers: Sequence[int], text_tokens: float) -> float:
    """Forward FLOPs of one token up to the deepest requested layer (weights
    and attention over a text of `text_tokens` tokens)."""
    c = m.config
    h, inter = c["hidden_size"], c.get("intermediate_size") or 4 * c["hidden_size"]
    hd = c.get("head_dim") or h // max(c.get("num_heads") or 1, 1)
    q, kv = (c.get("num_heads") or 1) * hd, (c.get("num_kv_heads") or c.get("num_heads") or 1) * hd
    deepest = max(max(layers), 1)
    per_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * inter) + 4 * text_tokens * q
    return float(deepest * per_layer)


def auto_shard_size(spec: RunSpec, m: Model, layers: Sequence[int]) -> int:
    """Records per shard so one shard takes about SHARD_TARGET_S seconds at a slow
    machine's rate for this model and device kind: estimated from the model's
    size, the device type and the mean text length of the first AUTO_SAMPLE
    records (2 characters per token, a pessimistic ratio), rounded down to 1-2-5
    and clamped to SHARD_SIZE_RANGE. Never from the record count, so a grown
    dataset keeps its shard boundaries."""
    lengths = [len(r.text) for r in itertools.islice(spec.records(), AUTO_SAMPLE) if isinstance(r, Record)]
    tokens = (sum(lengths) / len(lengths) if lengths else 1000.0) / 2.0 + 8.0
    rate = SLOW_FLOPS["cpu" if m.backend == "cpu" else "cuda"]
    seconds = tokens * flops_per_token(m, layers, tokens) / rate
    n = int(SHARD_TARGET_S / max(seconds, 1e-9))
    return _round_down_125(min(max(n, SHARD_SIZE_RANGE[0]), SHARD_SIZE_RANGE[1]))


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
                              extent=EXTENT, grows=self._grows)
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
        damaged = {f: why for f, why in problems.items() if f != ERRORS}   # errors.jsonl is derived
        if damaged and not self.spec.repair:
            raise StoreError(
                f"{self.out}: {len(damaged)} committed file(s) are damaged or missing, so the run "
                f"is not complete and nothing was changed:\n{damage_report(self.out, damaged)}"
                "\nRun the same command with --repair to redo exactly those shards "
                f"(`rjepa-latent verify {self.out}` checks every sha256)")
        self.problems = problems
        self.repaired = self.store.forget(damaged)

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
                print(f"rjepa-latent extract: resuming {self.out}: keeping {len(kept)} finished "
                      f"shards ({self.kept[1]:,} records); the shards after them are read (finished "
                      "ones skipped without tokenizing) and the rest computed"
                      + (" (the dataset grew: a partial last shard is redone)" if self.store.grown else ""),
                      file=sys.stderr)

    def say_resumed(self, shards: int, records: int) -> None:
        """After a resume: what was kept and what remained (now done)."""
        if self.kept[0]:
            print(f"rjepa-latent extract: resumed {self.out}: kept {self.kept[0]} finished shards "
                  f"({self.kept[1]:,} records); {shards} shards ({records:,} records) remained and "
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
        return self.store.finish(self.num_records)

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
            "grown": self.store.grown, "unknown_ids": list(self.unknown_ids),
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
        self.pooling = spec.pooling_value
        self.store_dtype = self.config["dtype"]
        self.budget = batch_budget(spec, m)
        self.tok = run_tokenizer(spec, m)
        self.max_text_tokens = self.config["max_tokens"]
        self.per_token = self.pooling == TOKEN_POOLING
        self.kernel = m.kernel
        self._run_config: dict | None = None

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
            try:
                good.append((t, self.m.check(t.ids, None if self.per_token else t.spans,
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
            res = self.m.run_batch([checked[i] for i in batch], self.layers, self.pooling)
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
        good, lats, errors = [], [], list(errors)
        for it, r in zip(items, results):
            lat, reason = convert_latents(np.asarray(r, dtype=np.float32), self.store_dtype)
            if reason is None:
                good.append(it)
                lats.append(lat)
            else:
                errors.append(ErrorRecord(it.index, it.id, it.source, it.line, reason))
        errors.sort(key=lambda e: e.index)
        return commit_shard(self.out, self.run_config(), index, records, good, lats,
                            [e.to_json() for e in errors], self.kernel)

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


# ------------------------------------------------------------ the API

def _load_model(model: Any, device: str | None, max_batch_tokens: int | None,
                threads: int | None) -> tuple[Model, bool]:
    """(the Model, whether this run loaded it and so closes it)."""
    if isinstance(model, (str, os.PathLike)):
        return Model(model, device=device, max_batch_tokens=max_batch_tokens, threads=threads), True
    if not isinstance(model, Model):
        raise TypeError(f"model must be a path or an rjepa_latent.Model, got {type(model).__name__}")
    return model, False


def engine_identity(m: Model) -> dict:
    """The configuration fields that say which engine computed the bytes."""
    from . import __version__
    return {"engine_backend": m.backend, "engine_dtype": m.dtype, "engine_kernel": m.kernel,
            "package_version": __version__}


def extract_dataset(inputs: str | os.PathLike | Sequence[str | os.PathLike], model: Any,
                    out: str | os.PathLike, *, format: str = "auto", layers: Sequence[int] = (-2,),
                    pooling: str | Sequence[str] = "mean", dtype: str = "float32",
                    template: str | None = None,
                    step_separator: str = DEFAULT_STEP_SEPARATOR, step_regex: str = DEFAULT_STEP_REGEX,
                    max_tokens: int | None = None, max_batch_tokens: int | None = None,
                    shard_size: int | str = AUTO, part: Any = (0, 1), strict: bool = False,
                    progress: bool = True, device: str | None = None, threads: int | None = None,
                    allow_kernel_change: bool = False, segment: str = "auto",
                    strip_annotations: bool = False, chat: bool = False, chat_think: bool = False,
                    system: str | None = None, repair: bool = False, limit: int | None = None,
                    ids: str | os.PathLike | Sequence[str] | None = None) -> dict:
    """Extract step latents of the records in `inputs` into the run directory `out`.

    `inputs` is a path or a list of paths of .jsonl / .json / .parquet files, or
    a `datasets.Dataset`; records are read lazily (memory does not grow with
    the dataset). `segment` is how free texts become steps
    (`data.Segmenter`: auto, lines, paragraphs, sentences, regex:PATTERN,
    ranges); `strip_annotations` removes GSM8K calculator annotations
    (`<<48/2=24>>`). `chat` renders each record through the model's chat
    template, `chat_think` (implies `chat`) with the steps as the assistant's
    reasoning, `system` adds a system message (needs `chat`); a model without
    a usable template is refused (ChatTemplateError, a ValueError) before
    the model is loaded and before anything is written.

    `model` is an `rjepa_latent.Model` (left as it was) or a checkpoint path
    (loaded with `device`, `max_batch_tokens`, `threads`, closed at the end).
    `dtype` is the stored dtype of the latents (not the engine's compute dtype,
    which is the Model's); `max_tokens` is the longest text, in tokens, a record
    may have (longer ones are errors; default the model's context);
    `max_batch_tokens` is the batch budget (default the Model's). `pooling` is one
    of mean, first, last, max, a sequence of them (all stored, from one forward;
    the first is what `open_latents(out)[i].latents` returns), or "none" (every
    token's hidden state; the disk it needs is checked first). `shard_size`:
    records per shard, or "auto" (default: about SHARD_TARGET_S seconds of a slow
    machine per shard, see docs/formats.md; resolved once and stored).
    `limit`: only the first `limit` records; `ids`: only the records with these
    ids (a file of one id per line, or a sequence); a later run without `limit`
    grows the run, one with other `ids` is refused.

    Resumes an interrupted run with the same options, and grows a finished
    (or partial) one whose last JSONL input was appended to (new shards; a
    partial last shard redone); refuses (StoreError) a directory made with
    other options, other data (not an append) or another engine (backend,
    compute dtype, kernel, package version), except a different kernel with
    `allow_kernel_change`. Returns a summary dict (items, steps, errors,
    error_kinds, tokens, wall_s, tokens_per_s, engine_tokens_per_s, ...). With
    `strict`, raises ValueError at the end if any record could not be
    processed. A data file that cannot hold records (binary, not UTF-8, not
    JSON) is refused up front (`data.InputFileError`); inputs with no record,
    or whose first 1000 records are all errors, stop before any shard
    (`NothingExtracted`; the errors' reasons in errors.jsonl).

    Every resume checks the committed shards first (sizes, headers against the
    journal, sidecar sha256) and raises StoreError naming any damaged one;
    `repair` also checks every payload sha256 and redoes exactly the damaged or
    missing shards in place (summary "repaired"); a single run only (part 0/1).
    """
    t_start = time.perf_counter()
    spec = run_spec(inputs, format=format, layers=layers, pooling=pooling, dtype=dtype, template=template,
                    step_separator=step_separator, step_regex=step_regex, max_tokens=max_tokens,
                    max_batch_tokens=max_batch_tokens, shard_size=shard_size, limit=limit, ids=ids,
                    part=part, allow_kernel_change=allow_kernel_change, segment=segment,
                    strip_annotations=strip_annotations, chat=chat, chat_think=chat_think,
                    system=system, repair=repair, model=model)
    if Path(out).exists() and not Path(out).is_dir():   # before the model load
        raise StoreError(f"--out {out} exists and is not a directory")
    m, owned = _load_model(model, device, max_batch_tokens, threads)
    try:
        return _extract(spec, m, out, strict=strict, progress=progress, t_start=t_start)
    finally:
        if owned:
            m.close()


def _extract(spec: RunSpec, m: Model, out: Any, *, strict: bool, progress: bool, t_start: float) -> dict:
    """One process: a driver and one ShardWorker, its stages in three threads."""
    config = run_config(spec, m)
    driver = RunDriver(spec, config, out, progress)   # refuses a clashing directory, touching nothing
    driver.check()
    if driver.complete:
        summary = driver.summary(0, 0.0, time.perf_counter() - t_start, 0, noop=True)
        return _strict({**summary, "repaired": []}, strict, out)
    worker = ShardWorker(m, spec, out, config)
    try:
        if worker.per_token:   # refuses before anything is written when the disk lacks the room
            _check_disk(driver, worker)
        runner = _Runner(worker, driver, progress)
        with m.workspace_for(worker.budget):  # a budget over the Model's: grown for this run only
            runner.run(driver.pending())
        driver.finish()
        driver.say_resumed(runner.written, runner.records_written)
        driver.say_unknown_ids()
        summary = driver.summary(runner.written, runner.compute_s, time.perf_counter() - t_start,
                                 runner.tokens)
    finally:
        driver.close()
    summary["throughput_warnings"] = runner.watch.warnings
    summary["repaired"] = driver.repaired
    return _strict(summary, strict, out)


def _reading_config(reading: dict) -> dict:
    """The configuration fields of segmentation, annotation stripping and chat, each
    only when not the default: a run without them keeps the configuration (and
    the manifest bytes) it had before these options existed."""
    out: dict = {}
    if reading["segment"].rule != "auto":
        out["segment"] = reading["segment"].rule
    if reading["strip"]:
        out["strip_annotations"] = True
    if reading["chat"] is not None:
        out.update(reading["chat"].to_json())
    return out


class _TemplateTokens:
    """A chat-rendered text holds its special tokens already (the template wrote
    them): it is encoded without the tokenizer's own (no second BOS), as
    transformers' apply_chat_template(tokenize=True) does."""

    def __init__(self, tok):
        self._tok = tok

    def encode_batch(self, texts):
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()


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
    itemsize = np.dtype(STORE_DTYPES[worker.store_dtype][1]).itemsize
    need = tokens * (n_layers * hidden * itemsize + 4)
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    gib = 1024 ** 3
    print(f"rjepa-latent extract: per-token output: {tokens:,} tokens x {n_layers} layers x "
          f"{hidden} hidden x {itemsize} bytes (+ 4 bytes of step index per token) = "
          f"{need / gib:.3f} GiB; {free / gib:.3f} GiB free on {where}", file=sys.stderr)
    if need > free:
        raise StoreError(f"not enough disk for a per-token run in {out}: it needs {need:,} bytes "
                         f"({need / gib:.3f} GiB: {tokens:,} tokens x {n_layers} layers x {hidden} "
                         f"hidden in {worker.store_dtype}) but {where} has {free:,} bytes free; free "
                         f"space, or use another --out, fewer --layers or a smaller --dtype; "
                         f"nothing was written")
    return need


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
    raise NothingExtracted(
        f"{what} of {sources} are errors ({kinds}); stopped before extracting anything: is this the "
        f"right file, and the right --format (now {fmt})? Each record's reason is in "
        f"{store.out / ERRORS}")


def error_kinds(errors: list[dict]) -> Counter:
    return Counter(error_kind(e["reason"]) for e in errors)


def _strict(summary: dict, strict: bool, out: Any) -> dict:
    if strict and summary["errors"]:
        raise ValueError(f"{summary['errors']} records could not be processed (strict); "
                         f"see {Path(out) / 'errors.jsonl'}")
    return summary


class _Runner:
    """One process's pipeline over a ShardWorker's three stages, each in its own
    thread: the tokenizer thread reads the pending shards from the driver and
    prepares them, the calling thread computes, the writer thread commits."""

    def __init__(self, worker: ShardWorker, driver: RunDriver, progress: bool):
        self.worker, self.driver = worker, driver
        self.watch = ThroughputWatch(worker.budget)
        self.compute_s = 0.0
        self.tokens = 0
        self.written = 0
        self.records_written = 0
        self.progress = progress

    def run(self, pending: Iterator) -> None:
        stop = threading.Event()
        plans: queue.Queue = queue.Queue(maxsize=2)
        writes: queue.Queue = queue.Queue(maxsize=1)
        worker = self.worker

        def produce() -> None:
            for k, rng, recs in pending:
                if not _put(plans, worker.prepare(k, rng, recs), stop):
                    return
            _put(plans, None, stop)

        def write() -> None:
            while True:
                try:
                    job = writes.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():  # the main thread failed: do not linger
                        return
                    continue
                if job is None:
                    return
                entry = worker.commit(job)
                self.driver.note(entry)
                self.written += 1
                self.records_written += entry["records"][1] - entry["records"][0]

        producer, writer = _Worker(produce, "tokenizer"), _Worker(write, "writer")
        producer.start()
        writer.start()
        bar = self._bar()
        t0 = time.perf_counter()
        try:
            while True:
                shard = _get(plans, producer)
                if shard is None:
                    break
                job = self._compute(shard, bar, t0)
                _put_checked(writes, job, writer)
            _put_checked(writes, None, writer)
            while writer.is_alive():
                writer.join(0.1)
            if writer.error is not None:
                raise writer.error
        finally:
            stop.set()
            # let the writer finish the shard it holds (even on Ctrl-C): what it
            # committed is in the journal and need not be recomputed
            while writer.is_alive():
                writer.join(0.1)
            if bar is not None:
                bar.close()

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.driver.spec.limit, unit="item", desc="extract", dynamic_ncols=True,
                    file=sys.stderr)

    def _compute(self, shard: dict, bar, t0: float) -> tuple:
        def on_batch(n_items: int, n_tok: int, dt: float) -> None:
            self.compute_s += dt
            self.tokens += n_tok
            self.watch.record(n_tok, dt)
            if bar is not None:
                bar.update(n_items)
                bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                                    refresh=False)
        job = self.worker.compute(shard, on_batch)
        if bar is not None:
            bar.update(len(shard["errors"]))
        return job


def _put_checked(q: queue.Queue, item: Any, worker: _Worker) -> None:
    """Put `item` for `worker`, raising its error (or that it died) instead of waiting forever."""
    while True:
        if worker.error is not None:
            raise worker.error
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if not worker.is_alive():
                raise RuntimeError("writer thread ended unexpectedly")


# ------------------------------------------------------------ CLI

def _unescape(s: str) -> str:
    """Command-line convenience: \\n, \\t and \\\\ in --template / --step-separator."""
    return re.sub(r"\\(n|t|\\)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], s)


def _layers_arg(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {s!r}") from None


def _pooling_arg(s: str) -> str | list[str]:
    """--pooling mean or --pooling mean,max,last (one name stays a str)."""
    names = [x.strip() for x in s.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"--pooling takes comma-separated names with none empty "
                                         f"(e.g. mean,max,last), got {s!r}")
    try:
        resolve_poolings(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names[0] if len(names) == 1 else names


def _shard_size_arg(s: str) -> int | str:
    if s.strip() == AUTO:
        return AUTO
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-size takes a number of records or auto, got {s!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    # let `--layers -2,8` read as a value, not an option (argparse only knows "-2")
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")
    p.add_argument("data", nargs="+", metavar="DATA", help=".jsonl, .json (array) or .parquet files of records")
    p.add_argument("--model", help="HF checkpoint directory or .gguf file (default: the default model)")
    p.add_argument("--out", required=True, help="run directory (created; resumed if it exists)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="record format (default: by fields)")
    p.add_argument("--layers", type=_layers_arg, default=[-2],
                   help="comma-separated hidden_states indices, e.g. --layers=-2 or --layers=8,16 (default -2)")
    p.add_argument("--pooling", default="mean", type=_pooling_arg,
                   help=f"one of {', '.join(POOLINGS)}, or several comma-separated span poolings "
                        "(e.g. mean,max,last: all stored, from one forward; the first is "
                        "`.latents`); none stores every token's hidden state (default mean)")
    p.add_argument("--dtype", default="float32", choices=list(STORE_DTYPES),
                   help="dtype of the stored latents (the engine computes in the Model's dtype)")
    p.add_argument("--template", default=None,
                   help="text template with {question} and {steps} (default '{question}\\n{steps}')")
    p.add_argument("--step-separator", default="\\n", help="between steps (default '\\n')")
    p.add_argument("--step-regex", default=DEFAULT_STEP_REGEX,
                   help=f"step marker of --format text (default {DEFAULT_STEP_REGEX!r})")
    p.add_argument("--segment", default="auto", metavar="RULE",
                   help=f"how free texts become steps: {', '.join(SEGMENT_RULES)} (default auto: the "
                        "format's own rule)")
    p.add_argument("--strip-annotations", action="store_true",
                   help="remove GSM8K calculator annotations (<<48/2=24>>) from the text")
    p.add_argument("--chat", action="store_true", help="render each record through the model's chat template")
    p.add_argument("--chat-think", action="store_true",
                   help="--chat with the steps as the assistant's reasoning (e.g. Qwen3's <think> block) "
                        "and the record's answer as its content")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest text in tokens; longer ones are errors (default: the model's context)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget of one batch")
    p.add_argument("--shard-size", type=_shard_size_arg, default=DEFAULT_SHARD_SIZE,
                   help="input records per shard, or auto (default: about 10 s of a slow machine per "
                        "shard, chosen once from the model, the device and the first records)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N records (a trial run; a later run without it grows the run)")
    p.add_argument("--ids", default=None, metavar="FILE",
                   help="only the records whose id is a line of FILE (a sample; unknown ids are reported)")
    p.add_argument("--part", default="0/1", help="worker i of n: i/n (default 0/1)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda:0 if a CUDA device is visible; never "
                        "the emulated device of a RJEPA_CUDA=emu test build)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--allow-kernel-change", action="store_true",
                   help="resume under another kernel identity (BLAS core / GPU + cuBLAS); each shard "
                        "records the kernel it was computed with")
    p.add_argument("--repair", action="store_true",
                   help="check every committed file's sha256 and redo exactly the damaged or missing "
                        "shards (a single run; the other options as for the run)")
    p.add_argument("--strict", action="store_true", help="exit status 1 if any record is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from . import ray as ray_cli   # --ray and its options live in rjepa_latent/ray.py (ray itself is not imported)
    ray_cli.add_arguments(p)


def _default_model() -> str:
    try:
        from .default_model import default_model_path
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.default_model":
            raise
        raise SystemExit("rjepa-latent extract: --model is required (no default model in this build)") from None
    return default_model_path()


def run(args: argparse.Namespace) -> int:
    from .errors import ModelFormatError, StoreError
    try:
        from . import ray as ray_cli   # --ray: rjepa_latent/ray.py runs it; ray is imported only then
        if ray_cli.wanted(args):
            return ray_cli.run(args)
        return _run(args)
    except NothingExtracted as e:
        print(f"rjepa-latent extract: error: {e}", file=sys.stderr)
        return 1
    except (StoreError, ModelFormatError, ValueError, OSError, RuntimeError) as e:  # OSError: --out unwritable, disk full
        print(f"rjepa-latent extract: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished shards are listed; run the same command to resume
        print(f"\nrjepa-latent extract: interrupted; {args.out} keeps every finished shard: "
              "run the same command again to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    model = args.model or _default_model()
    summary = extract_dataset(
        args.data, model, args.out, format=args.format, layers=args.layers, pooling=args.pooling,
        dtype=args.dtype, template=None if args.template is None else _unescape(args.template),
        step_separator=_unescape(args.step_separator), segment=args.segment,
        strip_annotations=args.strip_annotations, chat=args.chat, chat_think=args.chat_think,
        system=args.system,
        step_regex=args.step_regex, max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
        shard_size=args.shard_size, part=args.part, progress=not args.no_progress,
        device=args.device, threads=args.threads, allow_kernel_change=args.allow_kernel_change,
        repair=args.repair, limit=args.limit, ids=args.ids)
    return report_run(summary, args, format_summary(summary))


def report_run(summary: dict, args: argparse.Namespace, text: str) -> int:
    """The CLI's end of an extract run (one process or Ray): the --repair line,
    the summary `text`, and the exit status (1 when nothing was extracted, or
    on errors with --strict)."""
    if args.repair:
        fixed = summary.get("repaired", [])
        print("rjepa-latent extract: --repair: every committed file checked; "
              + (f"redid shard(s) {', '.join(map(str, fixed))}" if fixed else "no shard was damaged"),
              file=sys.stderr)
    print(text)
    if nothing_extracted(summary):
        why = ("the inputs hold no records" if not summary["records"] else
               f"all {summary['errors']} records are errors: their reasons are in {summary['errors_file']}; "
               "fix the records (or the --format / --segment options) and run again into a new --out")
        print(f"rjepa-latent extract: nothing was extracted: {why}", file=sys.stderr)
        return 1
    if args.strict and summary["errors"]:
        print(f"rjepa-latent extract: {summary['errors']} records could not be processed "
              f"(see {summary['errors_file']}); --strict", file=sys.stderr)
        return 1
    return 0


def nothing_extracted(s: dict) -> bool:
    """No item: the inputs hold no record, or this worker's shards hold only errors."""
    return s["items"] == 0 and (not s["records"] or s["shards_total"] > 0)


def format_errors(s: dict, top: int = 5) -> str:
    """'' or a line: the errors by kind, most common first, and where they are."""
    if not s["errors"]:
        return ""
    kinds = list(s["error_kinds"].items())
    shown = "; ".join(f"{n} x {k}" for k, n in kinds[:top])   # a kind never holds "; "
    more = f"; {sum(n for _, n in kinds[top:])} more of {len(kinds) - top} other kinds" if len(kinds) > top else ""
    return f"\n  errors by reason: {shown}{more}. Each record's reason is in {s['errors_file']}"


def format_summary(s: dict) -> str:
    if s["noop"]:
        return (f"{s['out']}: already complete ({s['items']} items, {s['steps']} steps, "
                f"{s['errors']} errors); nothing to do" + format_errors(s))
    ratio = s["tokens_per_s"] / s["engine_tokens_per_s"] if s["engine_tokens_per_s"] else 0.0
    return (f"{s['out']} [{s['part']}]: {s['items']} items, {s['steps']} steps, {s['errors']} errors; "
            f"{s['shards_written']} shards written this run ({s['tokens_this_run']:,} tokens) in "
            f"{s['wall_s']:.1f} s: {s['tokens_per_s']:,.0f} tokens/s end to end, "
            f"{s['engine_tokens_per_s']:,.0f} in the engine ({ratio:.0%}); "
            f"{'complete' if s['complete'] else 'not complete yet'}" + format_errors(s))

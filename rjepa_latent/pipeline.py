"""`extract_dataset` and the `rjepa-latent extract` subcommand: records ->
tokens -> planned batches -> engine -> shards, resumable, with progress.

Design choices:
- Records are parsed up front (cheap, and needed for duplicate ids and shard
  boundaries). Then three threads, one job each, joined by bounded queues:
  a producer tokenizes, checks and plans the next shards (`encode_batch`
  runs in Rust without the GIL); the calling thread runs the engine
  (`Model.run_batch`: the core releases the GIL); a writer thread converts, checksums,
  writes and fsyncs shards. So tokenization and disk I/O overlap with
  compute, and end-to-end tokens/s stays close to the bare engine's.
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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import (DEFAULT_STEP_REGEX, DEFAULT_STEP_SEPARATOR, DEFAULT_TEMPLATE, FORMATS, SEGMENT_RULES,
                   Chat, ErrorRecord, Record, Segmenter, Template, dataset_fingerprint, input_sources,
                   is_dataset, read_records)
from .errors import InputError, StoreError, TokenIdError
from .model import POOLINGS, TOKEN_POOLING, Model, resolve_poolings
from .plan import part_shards, plan_batches, shard_ranges
from .store import ERRORS, STORE_DTYPES, RunStore, atomic_write, convert_latents, damage_report
from .tokenize import Item, prepare_tokenizer, tokenize_records, tokenizer_hash

DEFAULT_SHARD_SIZE = 1000
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


def _shard_work(k: int, rng: tuple[int, int], records: list, tok, max_text_tokens: int | None,
                m: Model, budget: int, per_token: bool = False) -> dict:
    """(in the tokenizer thread) Tokenize, check and plan one shard: items and
    their checked sequences (input order), errors, planned batches."""
    recs = records[rng[0]:rng[1]]
    done = tokenize_records(tok, [r for r in recs if isinstance(r, Record)], max_text_tokens)
    errors = [r for r in recs if isinstance(r, ErrorRecord)] + [t for t in done if isinstance(t, ErrorRecord)]
    good = []
    for t in sorted((t for t in done if isinstance(t, Item)), key=lambda it: it.index):
        try:
            good.append((t, m.check(t.ids, None if per_token else t.spans, per_token=per_token,
                                    name="ids", spans_name="spans")))
        except InputError as e:
            errors.append(ErrorRecord(t.index, t.id, t.source, t.line, _refusal(e)))
    checked = [c for _, c in good]
    return {"index": k, "records": rng, "items": [t for t, _ in good], "checked": checked,
            "errors": errors,
            "batches": plan_batches([c.ids.size for c in checked], budget,
                                    [c.spans.shape[0] for c in checked])}


def _refusal(e: InputError) -> str:
    """The errors.jsonl reason of a tokenized record the engine cannot take."""
    hint = "; the tokenizer does not match the model" if isinstance(e, TokenIdError) else ""
    return f"the engine cannot take this record's tokens: {e}{hint}"


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
                    shard_size: int = DEFAULT_SHARD_SIZE, part: Any = (0, 1), strict: bool = False,
                    progress: bool = True, device: str | None = None, threads: int | None = None,
                    allow_kernel_change: bool = False, segment: str = "auto",
                    strip_annotations: bool = False, chat: bool = False, chat_think: bool = False,
                    system: str | None = None, repair: bool = False) -> dict:
    """Extract step latents of the records in `inputs` into the run directory `out`.

    `inputs` is a path or a list of paths of .jsonl / .json / .parquet files, or
    a `datasets.Dataset`. `segment` is how free texts become steps
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
    token's hidden state; the disk it needs is checked first). Resumes an
    interrupted run with the same options; refuses (StoreError) a directory made
    with other options or another engine (backend, compute dtype, kernel, package
    version), except a different kernel with `allow_kernel_change`. Returns a
    summary dict (items, steps, errors, error_kinds, tokens, wall_s, tokens_per_s,
    engine_tokens_per_s, ...). With `strict`, raises ValueError at the end if
    any record could not be processed. A data file that cannot hold records
    (binary, not UTF-8, not JSON) is refused up front (`data.InputFileError`);
    when the first 1000 records (or all, if fewer) are all errors, the run
    stops before any shard (`NothingExtracted`, their reasons in errors.jsonl).

    Every resume checks the committed shards first (sizes, headers against the
    manifest, sidecar sha256) and raises StoreError naming any damaged one;
    `repair` also checks every payload sha256 and redoes exactly the damaged or
    missing shards in place (summary "repaired"); a single run only (part 0/1).
    """
    t_start = time.perf_counter()
    store_dtype, max_text_tokens = dtype, max_tokens  # one meaning per name from here on
    dataset = inputs if is_dataset(inputs) else None
    paths = None if dataset is not None else \
        [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if paths is not None and not paths:
        raise ValueError("inputs is empty: give at least one .jsonl, .json or .parquet file")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    names, _ = resolve_poolings(pooling)   # ValueError / TypeError naming the mistake
    pooling = names[0] if len(names) == 1 else list(names)   # one name is stored as a str
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    for name, v in (("max_tokens", max_text_tokens), ("max_batch_tokens", max_batch_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
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
    segmenter = Segmenter(segment, step_regex)
    source = dataset if dataset is not None else paths
    input_sources(source)  # missing files, unreadable Parquet: refused now
    fingerprint = [dataset_fingerprint(dataset)] if dataset is not None else input_fingerprint(paths)
    chat_with = None
    if chat and isinstance(model, (str, os.PathLike, Model)):  # refused before the model is loaded
        chat_with = Chat.for_model(model.path if isinstance(model, Model) else model, chat_think, system)
    reading = {"segment": segmenter, "strip": bool(strip_annotations), "chat": chat_with}

    m, owned = _load_model(model, device, max_batch_tokens, threads)
    try:
        return _extract(source, m, out, fmt=format, layers=layers, pooling=pooling,
                        store_dtype=store_dtype, tmpl=tmpl, step_regex=step_regex, reading=reading,
                        max_text_tokens=max_text_tokens, budget=max_batch_tokens or m.max_batch_tokens,
                        shard_size=shard_size, part=part, strict=strict, progress=progress,
                        fingerprint=fingerprint, allow_kernel_change=allow_kernel_change,
                        t_start=t_start, repair=repair)
    finally:
        if owned:
            m.close()


def _extract(source: Any, m: Model, out: Any, *, fmt: str, layers: Sequence[int], pooling: str,
             store_dtype: str, tmpl: Template, step_regex: str, reading: dict, max_text_tokens: int | None,
             budget: int, shard_size: int, part: tuple[int, int], strict: bool, progress: bool,
             fingerprint: list[dict], allow_kernel_change: bool, t_start: float,
             repair: bool = False) -> dict:
    lays = m.resolve_layers(layers)
    if m.backend != "cpu" and budget > m.max_batch_tokens:
        raise ValueError(f"max_batch_tokens={budget} is more than the {m.max_batch_tokens} tokens "
                         f"of workspace this Model reserved on {m.device}; load the Model with "
                         f"max_batch_tokens={budget}, or pass a smaller one")
    tok = prepare_tokenizer(m.tokenizer)
    chat = reading["chat"]
    if chat is not None:
        tok = _TemplateTokens(tok)
    if max_text_tokens is None:
        max_text_tokens = m.config.get("max_position_embeddings")
    config = {
        "model_fingerprint": m.fingerprint, "model_type": m.config.get("model_type"),
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "layers": lays,
        "pooling": pooling, "dtype": store_dtype, "format": fmt, **tmpl.to_json(), "step_regex": step_regex,
        "max_tokens": max_text_tokens, "tokenizer_sha256": tokenizer_hash(tok), "inputs": fingerprint,
        "dataset_sha256": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest(),
        "shard_size": shard_size, **engine_identity(m),
        # on CUDA a batch's composition changes bf16 bits (on the CPU it never
        # does): the budget that decides it is part of the run there
        **({"engine_batch_tokens": budget} if m.backend != "cpu" else {}),
        **_reading_config(reading),
    }
    # refuses a clashing directory, touching nothing
    store = RunStore(out, config, part, allow_kernel_change=allow_kernel_change)
    problems = store.check_committed(full=repair, progress=progress)   # see docs/formats.md
    # errors.jsonl is derived, and stale after a kill between the manifest and it: rewritten below
    damaged = {f: why for f, why in problems.items() if f != ERRORS}
    if damaged and not repair:
        raise StoreError(f"{out}: {len(damaged)} committed file(s) are damaged or missing, so the run "
                         f"is not complete and nothing was changed:\n{damage_report(Path(out), damaged)}"
                         "\nRun the same command with --repair to redo exactly those shards "
                         f"(`rjepa-latent verify {out}` checks every sha256)")
    repaired = store.forget(damaged)
    if store.is_complete() and not problems:
        summary = _summary(store, part, [], 0.0, time.perf_counter() - t_start, noop=True)
        return _strict({**summary, "repaired": []}, strict, out)

    reader = read_records(source, fmt, tmpl, step_regex, segment=reading["segment"],
                          strip_annotations=reading["strip"], chat=chat)
    records = list(itertools.islice(reader, EARLY_STOP_RECORDS))
    if records and not store.done() and all(isinstance(r, ErrorRecord) for r in records):
        _early_stop(store, records, fmt)   # raises: nothing but errors so far, so no run
    records += reader
    per_token = pooling == TOKEN_POOLING
    if per_token:   # refuses before anything is written when the disk lacks the room
        _check_disk(Path(out), store, records, tok, max_text_tokens, shard_size, part,
                    len(lays), m.hidden_size, store_dtype)
    store.prepare(len(records))
    try:
        done = store.done()
        ranges = shard_ranges(len(records), shard_size)
        pending = [k for k in part_shards(len(ranges), part) if k not in done]
        if done and pending:
            _say_resuming(out, ranges, done, pending)
        runner = _Runner(m, store, lays, pooling, store_dtype, budget, progress,
                         total=sum(ranges[k][1] - ranges[k][0] for k in pending))
        with m.workspace_for(budget):  # a budget over the Model's: grown for this run only
            runner.run(pending, lambda k: _shard_work(k, ranges[k], records, tok, max_text_tokens,
                                                      m, budget, per_token))
        if problems:   # errors.jsonl is derived: rewritten whole once the shards are mended
            store.rewrite_errors()
        summary = _summary(store, part, pending, runner.compute_s, time.perf_counter() - t_start,
                           noop=False, tokens_run=runner.tokens)
    finally:
        store.close()
    summary["throughput_warnings"] = runner.watch.warnings
    summary["repaired"] = repaired
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


def _check_disk(out: Path, store: RunStore, records: list, tok, max_text_tokens: int | None,
                shard_size: int, part: tuple[int, int], n_layers: int, hidden: int,
                store_dtype: str) -> int:
    """A per-token run stores tokens x layers x hidden values (+ 4 bytes of step
    index per token): counts the tokens of the shards still to do (tokenized
    here, so records that fail tokenization count nothing), prints the need,
    and raises StoreError when `shutil.disk_usage` of `out` (or its nearest
    existing parent) has less free. Returns the bytes needed."""
    done = store.done()
    ranges = shard_ranges(len(records), shard_size)
    tokens = 0
    for k in part_shards(len(ranges), part):
        if k in done:
            continue
        recs = [r for r in records[ranges[k][0]:ranges[k][1]] if isinstance(r, Record)]
        tokens += sum(len(t.ids) for t in tokenize_records(tok, recs, max_text_tokens)
                      if isinstance(t, Item))
    itemsize = np.dtype(STORE_DTYPES[store_dtype][1]).itemsize
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
                         f"hidden in {store_dtype}) but {where} has {free:,} bytes free; free "
                         f"space, or use another --out, fewer --layers or a smaller --dtype; "
                         f"nothing was written")
    return need


class NothingExtracted(ValueError):
    """The first records of the inputs are all errors: the run stops before any shard."""


def _early_stop(store: RunStore, records: list, fmt: str) -> None:
    """Writes the errors of the first records to errors.jsonl (nothing else) and
    raises NothingExtracted naming their most common reasons."""
    errors = [r.to_json() for r in records]
    store.out.mkdir(parents=True, exist_ok=True)
    atomic_write(store.out / ERRORS, [b"".join(json.dumps(e, ensure_ascii=False).encode("utf-8") + b"\n"
                                               for e in errors)], store.tag)
    kinds = "; ".join(f"{n} x {k}" for k, n in error_kinds(errors).most_common(3))
    sources = ", ".join(dict.fromkeys(r.source for r in records))
    what = f"all {len(records)} records" if len(records) < EARLY_STOP_RECORDS else \
        f"the first {len(records)} records"
    raise NothingExtracted(
        f"{what} of {sources} are errors ({kinds}); stopped before extracting anything: is this the "
        f"right file, and the right --format (now {fmt})? Each record's reason is in "
        f"{store.out / ERRORS}")


def _say_resuming(out: Any, ranges: list, done: dict, pending: list[int]) -> None:
    kept = sum(ranges[k][1] - ranges[k][0] for k in done)
    left = sum(ranges[k][1] - ranges[k][0] for k in pending)
    print(f"rjepa-latent extract: resuming {out}: keeping {len(done)} finished shards ({kept:,} records); "
          f"{len(pending)} shards ({left:,} records) remain", file=sys.stderr)


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def error_kind(reason: str) -> str:
    """A reason without its particulars: the text before the first ': ' (or ' ('),
    quoted values as '…' and numbers as N, so like errors group."""
    head = re.split(r": | \(|; ", reason, maxsplit=1)[0]
    # standalone numbers only: UTF-8, 0xff, float16 keep their digits
    head = re.sub(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w-])", "N", _QUOTED.sub("'…'", head))
    return head[:80]


def error_kinds(errors: list[dict]) -> Counter:
    return Counter(error_kind(e["reason"]) for e in errors)


def _strict(summary: dict, strict: bool, out: Any) -> dict:
    if strict and summary["errors"]:
        raise ValueError(f"{summary['errors']} records could not be processed (strict); "
                         f"see {Path(out) / 'errors.jsonl'}")
    return summary


class _Runner:
    """Runs the engine over planned shards with a tokenizer and a writer thread."""

    def __init__(self, m: Model, store: RunStore, layers: list[int], pooling: str, store_dtype: str,
                 budget: int, progress: bool, total: int):
        self.m, self.store, self.layers, self.pooling = m, store, layers, pooling
        self.store_dtype = store_dtype
        self.budget = budget
        self.watch = ThroughputWatch(budget)
        self.compute_s = 0.0
        self.tokens = 0
        self.progress, self.total = progress, total

    def run(self, pending: list[int], work) -> None:
        if not pending:
            return
        stop = threading.Event()
        plans: queue.Queue = queue.Queue(maxsize=2)
        writes: queue.Queue = queue.Queue(maxsize=1)

        def produce() -> None:
            for k in pending:
                if not _put(plans, work(k), stop):
                    return

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
                self.store.write_shard(*_finish_shard(job, self.store_dtype))

        producer, writer = _Worker(produce, "tokenizer"), _Worker(write, "writer")
        producer.start()
        writer.start()
        bar = self._bar()
        t0 = time.perf_counter()
        try:
            for _ in pending:
                shard = _get(plans, producer)
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
            # wrote is listed in the manifest and need not be recomputed
            while writer.is_alive():
                writer.join(0.1)
            if bar is not None:
                bar.close()

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.total, unit="item", desc="extract", dynamic_ncols=True, file=sys.stderr)

    def _compute(self, shard: dict, bar, t0: float) -> tuple:
        items: list[Item] = shard["items"]
        checked = shard["checked"]
        results: list[np.ndarray | None] = [None] * len(items)
        for batch in shard["batches"]:  # one engine call per planned batch, exactly that batch
            n_tok = int(sum(checked[i].ids.size for i in batch))
            t = time.perf_counter()
            res = self.m.run_batch([checked[i] for i in batch], self.layers, self.pooling)
            dt = time.perf_counter() - t
            self.compute_s += dt
            self.tokens += n_tok
            self.watch.record(n_tok, dt)
            for i, r in zip(batch, res):
                results[i] = r
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                                    refresh=False)
        if bar is not None:
            bar.update(len(shard["errors"]))
        return shard["index"], tuple(shard["records"]), items, results, shard["errors"]


def _finish_shard(job: tuple, store_dtype: str) -> tuple:
    """(in the writer thread) a computed shard -> write_shard's arguments: latents in the
    stored dtype; items whose latents it cannot represent become errors."""
    index, records, items, results, errors = job
    good, lats, errors = [], [], list(errors)
    for it, r in zip(items, results):
        lat, reason = convert_latents(np.asarray(r, dtype=np.float32), store_dtype)
        if reason is None:
            good.append(it)
            lats.append(lat)
        else:
            errors.append(ErrorRecord(it.index, it.id, it.source, it.line, reason))
    errors.sort(key=lambda e: e.index)
    return index, records, good, lats, [e.to_json() for e in errors]


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


def _summary(store: RunStore, part: tuple[int, int], pending: list[int], compute_s: float, wall_s: float,
             noop: bool, tokens_run: int = 0) -> dict:
    if store.num_records is None:  # a finished run: the manifest says everything
        store.num_records = store.stored_num_records()
    entries = store.done()
    mine = [entries[k] for k in part_shards(store.num_shards, part) if k in entries]
    kinds = error_kinds([e for s in mine for e in s["errors"]])
    return {
        "out": str(store.out), "part": f"{part[0]}/{part[1]}", "noop": noop,
        "complete": store.is_complete(), "shards_written": len(pending), "shards_total": len(mine),
        "items": sum(s["items"] for s in mine), "steps": sum(s["steps"] for s in mine),
        "errors": sum(len(s["errors"]) for s in mine), "tokens": sum(s["tokens"] for s in mine),
        "tokens_this_run": tokens_run, "wall_s": wall_s, "compute_s": compute_s,
        "tokens_per_s": tokens_run / wall_s if wall_s > 0 else 0.0,
        "engine_tokens_per_s": tokens_run / compute_s if compute_s > 0 else 0.0,
        "records": store.num_records, "error_kinds": dict(kinds.most_common()),
        "errors_file": str(store.out / ERRORS),
    }


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
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="input records per shard")
    p.add_argument("--part", default="0/1", help="worker i of n: i/n (default 0/1)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:0 if visible)")
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
        repair=args.repair)
    if args.repair:
        fixed = summary.get("repaired", [])
        print("rjepa-latent extract: --repair: every committed file checked; "
              + (f"redid shard(s) {', '.join(map(str, fixed))}" if fixed else "no shard was damaged"),
              file=sys.stderr)
    print(format_summary(summary))
    if nothing_extracted(summary):
        why = ("the inputs hold no records" if not summary["records"] else
               f"all {summary['errors']} records are errors: their reasons are in {summary['errors_file']}; "
               "fix the records (or the --format / --segment options) and run again into a new --out")
        print(f"rjepa-latent extract: nothing was extracted: {why}", file=sys.stderr)
        return 1
    if args.strict and summary["errors"]:
        print(f"rjepa-latent extract: {summary['errors']} records could not be processed "
              f"(see {Path(args.out) / 'errors.jsonl'}); --strict", file=sys.stderr)
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

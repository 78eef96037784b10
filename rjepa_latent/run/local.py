"""`extract_dataset`: records -> tokens -> planned batches -> engine ->
shards, resumable, with progress, in one process (the `rjepa-latent extract`
subcommand is run/cli.py).

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

import os
import queue
import statistics
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..checkpoints.loader import read_config
from ..engine.model import Model, resolve_layers
from ..engine.sites import resolve_sites
from ..errors import StoreError
from ..inputs.data import DEFAULT_STEP_SEPARATOR
from ..inputs.segment import DEFAULT_STEP_REGEX
from .driver import RunDriver, _strict
from .spec import AUTO, RunSpec, run_config, run_spec
from .worker import ShardWorker, _check_disk


class ThroughputWarning(RuntimeWarning):
    """A batch ran at less than half the running median throughput."""


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


# ------------------------------------------------------------ the API

def _load_model(model: Any, device: str | None, max_batch_tokens: int | None,
                threads: int | None) -> tuple[Model, bool]:
    """(the Model, whether this run loaded it and so closes it)."""
    if isinstance(model, (str, os.PathLike)):
        return Model(model, device=device, max_batch_tokens=max_batch_tokens, threads=threads), True
    if not isinstance(model, Model):
        raise TypeError(f"model must be a path or an rjepa_latent.Model, got {type(model).__name__}")
    return model, False


def extract_dataset(inputs: str | os.PathLike | Sequence[str | os.PathLike], model: Any,
                    out: str | os.PathLike, *, format: str = "auto",
                    layers: Sequence[int] | None = None,
                    pooling: str | Sequence[str] = "mean", dtype: str = "float32",
                    template: str | None = None,
                    step_separator: str = DEFAULT_STEP_SEPARATOR, step_regex: str = DEFAULT_STEP_REGEX,
                    max_tokens: int | None = None, max_batch_tokens: int | None = None,
                    shard_size: int | str = AUTO, part: Any = (0, 1), strict: bool = False,
                    progress: bool = True, device: str | None = None, threads: int | None = None,
                    allow_kernel_change: bool = False, segment: str = "auto",
                    strip_annotations: bool = False, chat: bool = False, chat_think: bool = False,
                    system: str | None = None, repair: bool = False, limit: int | None = None,
                    ids: str | os.PathLike | Sequence[str] | None = None, tokens: str = "all",
                    drop_bos: bool = False, outliers: float | None = None,
                    drop_outliers: bool = False, sites: Sequence[str] | None = None) -> dict:
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
    token's hidden state; the disk it needs is checked first). `layers`: the
    hidden-state indices stored (default -2); `sites` instead: activation sites
    by TransformerLens name (docs/sites.md), each stored under its canonical
    name and read back with `open_latents(out)[i].site(name)`. `shard_size`:
    records per shard, or "auto" (default: about SHARD_TARGET_S seconds of a slow
    machine per shard, see docs/formats.md; resolved once and stored).
    `tokens` ("all", "text", "steps", "no-special") and `drop_bos` select the
    tokens a per-token run stores and a pooled span pools; `outliers=K` marks
    per-token rows whose norm is over K x their layer's median norm in the
    shard, `drop_outliers` leaves them out (docs/tokens.md).
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
                    system=system, repair=repair, model=model, tokens=tokens, drop_bos=drop_bos,
                    outliers=outliers, drop_outliers=drop_outliers, sites=sites)
    if Path(out).exists() and not Path(out).is_dir():   # before the model load
        raise StoreError(f"--out {out} exists and is not a directory")
    if isinstance(model, (str, os.PathLike)):   # layers against the config, before the model load
        num_layers = read_config(model)["num_layers"]
        if spec.sites:
            resolve_sites(spec.sites, num_layers)
        else:
            resolve_layers(spec.layers, num_layers, num_layers)
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
        # a resumed run starts from the records its kept shards already hold
        i, n = self.driver.spec.part
        done = sum(int(e["items"]) + len(e["errors"])
                   for k, e in self.driver.store.entries.items() if k % n == i)
        return tqdm(total=self.driver.spec.limit, initial=done, unit="item", desc="extract",
                    dynamic_ncols=True, file=sys.stderr)

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
            if not worker.is_alive():   # it may have failed while we waited: its error first
                raise worker.error or RuntimeError("writer thread ended unexpectedly")

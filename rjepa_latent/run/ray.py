"""Scale-out on Ray: `extract` (the run directory of `rjepa-latent extract`, computed
by a pool of actors, one per GPU or per group of CPUs) and `StepLatents` (a
callable class for `ray.data.Dataset.map_batches`). See docs/ray.md.

Design choices:
- Ray is an optional extra (`pip install ".[ray]"` in a clone). This module
  imports without it, so the CLI can define `--ray` and its options; ray is
  imported only when something here runs (`extract`, `StepLatents(...)`,
  `--ray`), and then its absence is an ImportError naming the install command.
- An `rjepa_latent.Model` cannot be pickled (it owns a C engine), so every
  actor loads its own from a checkpoint path. Inside a Ray worker the Model's
  device and threads follow what Ray assigned (`placement`): one GPU is
  `cuda:0` of the devices Ray makes visible; on the CPU the engine gets as
  many threads as CPUs assigned (its own default, all the cores of the
  machine, would oversubscribe them).
- `StepLatents` uses the package's own rules for every row: a batch's rows are
  read by `data.read_rows`, the CLI's reader of records (formats, segmentation,
  annotation stripping, duplicate ids within the batch), tokenized by
  `tokenize.tokenize_records` (the span rule), checked by `Model.check` and
  packed by `Model.extract`, so a row's latents equal what `rjepa-latent
  extract` stores for that record (on the CPU bit for bit: packing is
  bitwise neutral there). A row that cannot be processed becomes a row with
  an `error` and null latents; it never aborts the Dataset.
- `extract` is the pipeline's shard seam spread over actors: the driver (this
  process) holds the run directory (`driver.RunDriver`: refusals, the
  directory lock, pending shards read lazily, the final manifest) and hands
  shards out one at a time, at most IN_FLIGHT per actor (records travel with
  the shard; the dataset is never shipped whole); each actor owns a Model and
  a `worker.ShardWorker`, which commits its shard into the directory itself
  (atomic, no lock needed). So a fast actor takes more shards, and the shards,
  their bytes and the manifest are those of a single process.
- Faults: a shard whose actor died is handed to another actor (the dead one is
  restarted by Ray up to MAX_RESTARTS times, probed, and used again if it
  comes back); a shard that lost SHARD_ATTEMPTS actors stops the run. A
  killed driver loses nothing committed: the same command resumes. An
  exception inside a shard (not a lost actor) stops the run at once: it
  would recur.
- Before any shard, every actor reports its engine identity (the run
  configuration it would write, `spec.run_config`): actors that differ
  are refused as a resumed run would be (a kernel difference only with
  allow_kernel_change); and every actor reads a token file the driver wrote
  into the run directory, so a node that does not see the directory (it must
  be on a filesystem all nodes share) is named before any work.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..engine.model import TOKEN_POOLING, Model


INSTALL_HINT = "pip install 'ray[data]==2.60.0'  (the ray extra: pip install \".[ray]\" in a clone)"


def require_ray():
    """The `ray` module, or ImportError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"rjepa_latent.ray needs Ray (ray[data]), which is not installed; "
                          f"install it with: {INSTALL_HINT}") from None
    return ray


def placement(device: str | None = None, threads: int | None = None) -> tuple[str | None, int | None]:
    """(device, threads) of a Model built inside a Ray worker: `cuda:0` (the
    first GPU Ray made visible) when Ray assigned GPUs to it, else the CPU with
    one engine thread per CPU assigned (at least one). Explicit values are kept;
    outside a Ray actor both stay as given (the Model's own defaults)."""
    ray = require_ray()
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return device, threads   # not in a Ray actor: nothing was assigned
    if device is None:
        device = "cuda:0" if ray.get_gpu_ids() else "cpu"
    if threads is None and device == "cpu":
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            threads = max(1, int(cpus))
    return device, threads


# ------------------------------------------------------------ extract: actors

IN_FLIGHT = 2            # shards queued per actor: one computing, the next already there
MAX_RESTARTS = 2         # Ray restarts of a crashed actor (it reloads its Model)
SHARD_ATTEMPTS = 3       # actors a shard may lose before the run stops
START_TIMEOUT_S = 600.0  # for the pool to load its Models (the cluster has the resources: checked)
TOKEN_PREFIX = ".ray-visible"


class _ShardActor:
    """One Ray actor: a Model and a ShardWorker for the run (made once)."""

    def __init__(self, model: str, spec: Any, out: str, device: str | None, threads: int | None):
        from .spec import run_config
        device, threads = placement(device, threads)
        self.m = Model(model, device=device, max_batch_tokens=spec.max_batch_tokens, threads=threads)
        self.spec, self.out, self.threads = spec, out, threads
        self.config = run_config(spec, self.m)   # what this actor's bytes would be
        self.worker = None

    def hello(self, token_name: str | None = None, token: str | None = None) -> dict:
        """Where this actor runs, its run configuration (engine identity included),
        and whether it sees the run directory (the driver's token file)."""
        import socket
        from ..store.files import write_tag
        ray = require_ray()
        node = ray.get_runtime_context().get_node_id()
        ip = ray.util.get_node_ip_address()
        sees = None
        if token_name is not None:
            try:
                sees = (Path(self.out) / token_name).read_text(encoding="utf-8") == token
            except OSError:
                sees = False
        return {"node": node, "host": socket.gethostname(), "ip": ip, "pid": os.getpid(),
                "device": self.m.device, "threads": self.threads, "config": self.config, "sees": sees,
                "tag": write_tag("")}   # the prefix of its temporary files' tags

    def _worker(self):
        from .worker import ShardWorker
        if self.worker is None:
            self.worker = ShardWorker(self.m, self.spec, self.out, self.config)
        return self.worker

    def run_shard(self, k: int, rng: tuple[int, int], records: list) -> dict:
        return self._worker().run_shard(k, rng, records)

    def check_disk(self, config: dict) -> int:
        """A per-token run's disk check, as a single run does it (it tokenizes the
        records still to do, so it needs the tokenizer: a worker's); StoreError
        when the run directory's filesystem lacks the room. Reads only."""
        from .driver import RunDriver
        from .worker import _check_disk
        probe = RunDriver(self.spec, config, self.out)   # a reader of the directory: never started
        try:
            return _check_disk(probe, self._worker())
        finally:
            probe.close()


def _positive_number(name: str, v: Any, zero_ok: bool = False) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 if zero_ok else v > 0):
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} number, got {v!r}")


def _pool_shape(nodes: list[dict], workers: int | None, gpus: float | None,
                cpus: float | None) -> tuple[int, float, float]:
    """(workers, gpus_per_worker, cpus_per_worker), defaults filled in from the
    resources of the cluster's live `nodes` (`ray.nodes()[i]["Resources"]`):
    with GPUs one worker per GPU (1 CPU each), else one per node with that
    node's CPUs; refused (ValueError, never a wait for resources that do not
    exist) when the cluster cannot hold the pool. An actor lives on one node,
    so what counts is how many fit on each node, not the cluster's sums."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    _positive_number("gpus_per_worker", gpus, zero_ok=True)
    _positive_number("cpus_per_worker", cpus)
    total_gpus = sum(r.get("GPU", 0) for r in nodes)
    total_cpus = sum(r.get("CPU", 0) for r in nodes)
    if gpus is None:
        gpus = 1.0 if total_gpus >= 1 else 0.0
    if cpus is None:
        if gpus > 0:
            cpus = 1.0
        elif workers is None:
            cpus = max(1.0, min((r.get("CPU", 0) for r in nodes if r.get("CPU")), default=1.0))
        else:   # an equal share of the cluster's CPUs: whole ones where there are enough
            share = total_cpus / workers
            cpus = float(int(share)) if share >= 1 else share
    def fits(r: dict) -> int:   # workers one node can hold
        n = int((r.get("CPU", 0) + 1e-9) // cpus)
        return min(n, int((r.get("GPU", 0) + 1e-9) // gpus)) if gpus > 0 else n
    capacity = sum(fits(r) for r in nodes)
    if workers is None:
        workers = int(total_gpus // gpus) if gpus > 0 else capacity
    want = f"{workers} worker(s) x {gpus:g} GPU, {cpus:g} CPU"
    have = f"the cluster has {total_gpus:g} GPU(s) and {total_cpus:g} CPU(s) on {len(nodes)} node(s)"
    if workers <= 0 or workers > capacity:
        held = "no node can hold one worker" if not capacity else \
            f"node by node they hold {capacity} such worker(s)"
        raise ValueError(f"the pool does not fit: {want}, but {have} ({held}); pass fewer --workers "
                         "or smaller --gpus-per-worker / --cpus-per-worker")
    return workers, float(gpus), float(cpus)


class _Pool:
    """The actors of one run and the shards in flight on each."""

    def __init__(self, ray, model: str, spec: Any, out: Path, shape: tuple[int, float, float], run_id: str):
        self.ray = ray
        workers, gpus, cpus = shape
        cls = ray.remote(_ShardActor)
        device = "cuda:0" if gpus > 0 else "cpu"
        self.names = [f"rjepa-latent-{run_id}-w{i}" for i in range(workers)]
        self.actors = {name: cls.options(
            name=name, num_gpus=gpus, num_cpus=cpus, max_restarts=MAX_RESTARTS, max_task_retries=0,
            scheduling_strategy="SPREAD").remote(model, spec, str(out), device, None)
            for name in self.names}
        self.alive: set[str] = set()
        self.info: dict[str, dict] = {}
        self.lost = self.redone = 0
        self.token: tuple[str | None, str | None] = (None, None)   # the visibility check's file

    def start(self, timeout: float = START_TIMEOUT_S) -> dict[str, dict]:
        """Wait for every actor's Model; their hello (the first one's config
        is the run's). A worker that cannot load the model stops the run."""
        ray = self.ray
        refs = {self.actors[n].hello.remote(): n for n in self.names}
        ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if waiting:
            raise RuntimeError(f"{len(waiting)} of {len(refs)} Ray workers did not start within "
                               f"{timeout:.0f} s (resources busy with other jobs, or a slow model load)")
        for ref in ready:
            name = refs[ref]
            try:
                self.info[name] = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"Ray worker {name} could not start (load the model, read the run's "
                                   f"first records): {_cause(e)}") from None
            self.alive.add(name)
        self.started = dict(self.info)
        self.tags = {i["tag"] for i in self.info.values()}
        return self.info

    def shutdown(self) -> None:
        for a in self.actors.values():
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:   # already gone
                pass


def _cause(e: BaseException) -> BaseException | str:
    """The exception raised inside a Ray task or actor, else the Ray error itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else str(e).strip().splitlines()[-1]


def _identity_check(info: dict[str, dict], allow_kernel_change: bool) -> dict:
    """The run configuration all actors agree on (the first one's), or
    StoreError naming the actors that differ: actors of one run must compute
    the same bytes (a kernel difference only with allow_kernel_change)."""
    from ..errors import StoreError
    from ..store.files import config_differences
    names = sorted(info)
    first = info[names[0]]
    lines = []
    for n in names[1:]:
        diff = config_differences(first["config"], info[n]["config"],
                                  ("engine_kernel",) if allow_kernel_change else ())
        if diff:
            lines.append(f"{n} on {info[n]['host']} ({info[n]['device']}) vs {names[0]} on "
                         f"{first['host']} ({first['device']}):\n  " + "\n  ".join(diff))
    if lines:
        only_kernel = all(all(line.strip().startswith("engine_kernel") for line in block.splitlines()[1:])
                          for block in lines)
        hint = ("\nOnly the kernel differs: allow_kernel_change=True (--allow-kernel-change) runs "
                "them together, each shard recording the kernel that computed it." if only_kernel else "")
        if any("engine_batch_tokens" in block for block in lines):   # on CUDA sized to free memory
            hint += ("\nThe batch budget differs (left unset it is what fits in each GPU's free "
                     "memory, and on CUDA it decides the bytes): pass one --max-batch-tokens "
                     "(max_batch_tokens=) for all workers.")
        raise StoreError("the Ray workers of this run differ in what they compute (engine identity "
                         "or configuration), so their shards would not be one run's bytes; nothing "
                         "was written:\n" + "\n".join(lines) + hint)
    return first["config"]


# ------------------------------------------------------------ extract: the driver

_NOT_HERE = {
    "device": "each Ray worker uses the device Ray assigns it: cuda:0 of its GPU(s) with "
              "gpus_per_worker > 0 (--gpus-per-worker), else the CPU",
    "threads": "a CPU worker runs one engine thread per CPU Ray assigns it (cpus_per_worker, "
               "--cpus-per-worker)",
    "part": "with Ray the driver hands out every shard itself; part (--part) is for separate "
            "processes sharing a directory",
}


def connect(address: str | None = None):
    """Join `address`, else RAY_ADDRESS, else start a new local cluster (never an
    unrelated one found on this machine); returns (ray, whether we started the
    connection and so shut it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    import logging
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return ray, True


def extract(inputs: Any, out: str | os.PathLike, *, model: str | os.PathLike | None = None,
            workers: int | None = None, gpus_per_worker: float | None = None,
            cpus_per_worker: float | None = None, address: str | None = None, progress: bool = True,
            strict: bool = False, on_shard=None, **options) -> dict:
    """`extract_dataset` on a Ray cluster: the same run directory, shards and bytes
    as one process, computed by a pool of `workers` actors (each loads `model`,
    a checkpoint path, default the CLI's default model, once).

    `address`: the cluster to join (default RAY_ADDRESS, else a new local one;
    a process already connected to Ray uses that connection). `workers`,
    `gpus_per_worker`, `cpus_per_worker`: the pool (defaults: one worker per GPU
    with 1 CPU each; without GPUs one per node with the node's CPUs). `options`
    are `extract_dataset`'s (format, layers, pooling, dtype, shard_size, ...)
    except device, threads and part. `on_shard(info)` is called on the driver
    after each committed shard (its index, records, items, steps, tokens,
    errors, seconds and the worker's name). Returns `extract_dataset`'s summary
    plus `ray`: workers, nodes, lost workers and redone shards.

    `out` must be on a filesystem every node sees (checked before any shard).
    """
    import time
    import uuid
    from .driver import RunDriver, _strict
    from .spec import run_spec
    from ..errors import StoreError
    t_start = time.perf_counter()
    for name, why in _NOT_HERE.items():
        if name in options:
            raise ValueError(f"{name} is not an option of rjepa_latent.ray.extract: {why}")
    if model is None:
        from ..checkpoints.default_model import default_model_path
        model = default_model_path()
    if isinstance(model, Model):
        raise TypeError("model must be a checkpoint path: a Model cannot be pickled to Ray workers, "
                        "so each one loads its own")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a checkpoint path, got {type(model).__name__}")
    model = os.path.abspath(os.fspath(model))
    if not os.path.exists(model):
        raise FileNotFoundError(f"model {model!r} does not exist (a checkpoint directory or a .gguf file)")
    spec = run_spec(inputs, model=model, **options)   # every option checked, nothing started yet
    if not isinstance(spec.inputs, tuple):
        raise TypeError("rjepa_latent.ray.extract reads files (.jsonl, .json, .parquet); for a "
                        "datasets.Dataset or a Ray Dataset use StepLatents with map_batches")
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out} exists and is not a directory")
    ray, owned = connect(address)
    pool = driver = token_path = None
    try:
        shape = _pool_shape([n["Resources"] for n in ray.nodes() if n.get("Alive")],
                            workers, gpus_per_worker, cpus_per_worker)
        pool = _Pool(ray, model, spec, out, shape, uuid.uuid4().hex[:8])
        config = _identity_check(pool.start(), spec.allow_kernel_change)
        driver = RunDriver(spec, config, out, progress)   # refuses a clashing directory, touching nothing
        driver.check()
        if driver.complete:
            summary = driver.summary(0, 0.0, time.perf_counter() - t_start, 0, noop=True)
            return _strict({**summary, "repaired": [], "ray": _ray_summary(pool, {})}, strict, out)
        if spec.pooling == TOKEN_POOLING:   # refused before anything is written when the disk lacks room
            try:
                ray.get(pool.actors[pool.names[0]].check_disk.remote(config))
            except ray.exceptions.RayTaskError as e:
                raise _in_shard(e, pool.names[0], None, pool) from None
        pending = driver.pending()
        first = next(pending, None)   # reads the first records: refusals, then the directory is locked
        driver.start()
        token_path = _check_visible(pool, out)
        run = _Dispatch(ray, pool, driver, progress, on_shard)
        run.run(first, pending)
        _drop_temporaries(out, pool.tags)
        driver.finish()
        driver.say_resumed(run.written, run.records_written)
        driver.say_unknown_ids()
        summary = driver.summary(run.written, run.compute_s, time.perf_counter() - t_start, run.tokens)
        summary.update(throughput_warnings=0, repaired=driver.repaired, ray=_ray_summary(pool, run.per_worker))
        return _strict(summary, strict, out)
    finally:
        if token_path is not None:
            token_path.unlink(missing_ok=True)
        if driver is not None:
            driver.close()
        if pool is not None:
            pool.shutdown()
        if owned:
            ray.shutdown()


def _ray_summary(pool: _Pool, per_worker: dict) -> dict:
    return {"workers": len(pool.names), "nodes": len({i["node"] for i in pool.info.values()}),
            "lost_workers": pool.lost, "shards_per_worker": dict(per_worker),
            "redone_shards": pool.redone}


def _drop_temporaries(out: Path, tags: set[str]) -> None:
    """Remove what this run's actors left half-written (an actor killed mid-commit):
    every shard is committed by now, and these tags are theirs alone."""
    for p in out.iterdir():
        if p.name.startswith(".") and any(f".tmp-{t}" in p.name for t in tags):
            p.unlink(missing_ok=True)


def _check_visible(pool: _Pool, out: Path) -> Path:
    """Write a token file into the run directory and have every actor read it:
    a node that does not see the directory is named (StoreError) before any shard."""
    import secrets
    from ..errors import StoreError
    from ..store.files import write_tag
    token = secrets.token_hex(16)
    path = out / f"{TOKEN_PREFIX}.tmp-{write_tag('ray')}"
    path.write_text(token, encoding="utf-8")
    pool.token = (path.name, token)
    refs = {pool.actors[n].hello.remote(path.name, token): n for n in sorted(pool.alive)}
    blind = []
    for ref, name in refs.items():
        info = pool.ray.get(ref)
        pool.info[name] = info
        if not info["sees"]:
            blind.append(f"{name} on node {info['host']} ({info['ip']}, node id {info['node'][:12]})")
    if blind:
        raise StoreError(f"the run directory {out} is not visible from every Ray node: {'; '.join(blind)} "
                         f"cannot read {path.name} there. The run directory must be on a filesystem all "
                         "nodes share (NFS, a cluster volume); nothing was computed")
    return path


class _Dispatch:
    """Hands pending shards to actors (at most IN_FLIGHT each), records each
    committed shard with the driver, and redoes the shards of lost actors."""

    def __init__(self, ray, pool: _Pool, driver, progress: bool, on_shard):
        self.ray, self.pool, self.driver, self.on_shard = ray, pool, driver, on_shard
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=driver.spec.limit, unit="item", dynamic_ncols=True, file=sys.stderr,
                            desc=f"extract (ray, {len(pool.names)} workers)")
        self.written = self.tokens = self.records_written = 0
        self.compute_s = 0.0
        self.per_worker: dict[str, int] = {}

    def run(self, first, pending) -> None:
        from collections import deque
        ray, pool = self.ray, self.pool
        retry: deque = deque()
        source = iter(() if first is None else (first,))
        flights: dict = {}          # ref -> (actor name, shard, attempts) or (name, None, None): a probe
        load = {n: 0 for n in pool.names}
        exhausted = False

        def next_shard():
            nonlocal source, exhausted
            if retry:
                return retry.popleft()
            while not exhausted:
                for k, rng, recs in source:
                    return (k, rng, recs), 0
                if source is pending:
                    exhausted = True
                else:
                    source = pending
            return None

        def fill() -> None:
            for name in sorted(pool.alive, key=lambda n: load[n]):
                while load[name] < IN_FLIGHT:
                    job = next_shard()
                    if job is None:
                        return
                    shard, attempts = job
                    flights[pool.actors[name].run_shard.remote(*shard)] = (name, shard, attempts)
                    load[name] += 1

        try:
            fill()
            while flights:
                ready, _ = ray.wait(list(flights), num_returns=1)
                for ref in ready:
                    name, shard, attempts = flights.pop(ref)
                    if shard is None:   # a probe of a lost actor: back in the pool, or gone
                        self._probed(ref, name)
                        continue
                    load[name] -= 1
                    try:
                        s = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        self._lost(name, shard, attempts, e, retry, flights, load)
                        continue
                    except ray.exceptions.RayTaskError as e:
                        raise _in_shard(e, name, shard[0], pool) from None
                    self._committed(name, shard, s)
                fill()
                if not flights and (retry or not exhausted):
                    raise RuntimeError("every Ray worker of this run was lost; the committed shards are "
                                       "kept: run the same command again to resume")
        finally:
            if self.bar is not None:
                self.bar.close()

    def _committed(self, name: str, shard: tuple, s: dict) -> None:
        self.driver.note(s.pop("entry"))
        self.written += 1
        self.records_written += shard[1][1] - shard[1][0]
        self.tokens += s["tokens"]
        self.compute_s += s["seconds"]
        self.per_worker[name] = self.per_worker.get(name, 0) + 1
        if self.bar is not None:
            self.bar.update(shard[1][1] - shard[1][0])
        if self.on_shard is not None:
            self.on_shard({**s, "worker": name})

    def _lost(self, name: str, shard: tuple, attempts: int, e, retry, flights, load) -> None:
        pool = self.pool
        if attempts + 1 >= SHARD_ATTEMPTS:
            raise RuntimeError(f"shard {shard[0]} lost {attempts + 1} Ray workers (the last, {name}: "
                               f"{_cause(e)}); stopping. The committed shards are kept: run the same "
                               "command again to resume") from None
        retry.append((shard, attempts + 1))
        pool.redone += 1
        if name in pool.alive:   # probe it once: restarted by Ray, or dead for good
            pool.alive.discard(name)
            pool.lost += 1
            flights[pool.actors[name].hello.remote(*pool.token)] = (name, None, None)

    def _probed(self, ref, name: str) -> None:
        from ..errors import StoreError
        pool = self.pool
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError:
            return   # dead for good: its shards went back to the queue
        if not info["sees"]:
            raise StoreError(f"Ray worker {name}, restarted on node {info['host']} ({info['ip']}), "
                             f"cannot read the run directory {self.driver.out}: it must be on a "
                             "filesystem all nodes share")
        first = pool.names[0]   # the actor whose configuration the run took
        _identity_check({first: pool.started[first], f"{name} (restarted)": info},
                        self.driver.spec.allow_kernel_change)
        pool.info[name] = info
        pool.tags.add(info["tag"])
        pool.alive.add(name)


def _in_shard(e, name: str, k: int | None, pool: _Pool) -> BaseException:
    """The exception a shard raised inside its actor, named (it would recur
    elsewhere, so the run stops)."""
    cause = _cause(e)
    where = f"(in Ray worker {name} on {pool.info.get(name, {}).get('host', '?')}" + \
        (f", shard {k})" if k is not None else ")")
    if isinstance(cause, BaseException):
        if hasattr(cause, "add_note"):
            cause.add_note(where)
            return cause
        return type(cause)(f"{cause} {where}") if isinstance(cause, (ValueError, RuntimeError)) else cause
    return RuntimeError(f"{cause} {where}")

"""`--ray` and its options on `rjepa-latent extract`: the run on a Ray cluster
(ray itself is not imported here)."""
from __future__ import annotations

from .ray import _NOT_HERE, INSTALL_HINT, extract, require_ray


_RAY_OPTIONS = ("address", "workers", "gpus_per_worker", "cpus_per_worker")


def add_arguments(p) -> None:
    """--ray and its options, on `rjepa-latent extract` (ray is not imported here)."""
    g = p.add_argument_group(f"Ray (scale-out; needs {INSTALL_HINT})")
    g.add_argument("--ray", action="store_true",
                   help="run on a Ray cluster: join --address (or RAY_ADDRESS) or start a local one; "
                        "the same options, run directory and bytes as without --ray (--device cpu: "
                        "CPU workers, --device cuda: one GPU per worker)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="the Ray cluster to join, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else a new "
                        "local cluster)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray workers, each loading the model once (default: one per GPU; without GPUs "
                        "one per node)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker (default 1 where the cluster has GPUs, else 0: CPU workers)")
    g.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                   help="CPUs per worker; a CPU worker runs one engine thread per CPU (default: 1 with "
                        "GPUs, else all of a node's)")


def wanted(args) -> bool:
    """Whether this `extract` command is for Ray (--ray, or one of its options)."""
    return bool(getattr(args, "ray", False)) or any(getattr(args, k, None) is not None for k in _RAY_OPTIONS)


def _cli_options(args) -> dict:
    """extract_dataset's options from the command line, as `rjepa-latent extract`
    passes them (every extract_dataset parameter the parser defines)."""
    import inspect
    from .local import extract_dataset
    from .spec import _unescape
    given = vars(args)
    skip = {"inputs", "model", "out", "progress", "strict", "device", "threads", "part"}
    opts = {k: given[k] for k in inspect.signature(extract_dataset).parameters
            if k in given and k not in skip}
    for k in ("template", "step_separator"):
        if opts.get(k) is not None:
            opts[k] = _unescape(opts[k])
    return opts


def _gpus_per_worker(device: str | None, gpus: float | None) -> float | None:
    """--device as without Ray: `cpu` is CPU workers (no GPU each), `cuda` one
    GPU per worker (unless --gpus-per-worker says how many); a device index is
    Ray's to assign."""
    if device is None:
        return gpus
    if device == "cpu":
        if gpus:
            raise ValueError(f"--device cpu (CPU workers) does not go with --gpus-per-worker {gpus:g}")
        return 0
    if device == "cuda":
        if gpus is not None and gpus <= 0:
            raise ValueError("--device cuda (a GPU per worker) does not go with --gpus-per-worker 0")
        return 1 if gpus is None else gpus
    raise ValueError(f"--device {device} does not go with --ray: {_NOT_HERE['device']}; give "
                     "--device cuda (one GPU per worker) or --device cpu (CPU workers)")


def run(args) -> int:
    """`rjepa-latent extract --ray ...`: extract's options and outputs, on Ray. Errors
    propagate to `pipeline.run`, which turns them into exit statuses."""
    from .report import format_summary, report_run
    if not args.ray:
        given = [f"--{k.replace('_', '-')}" for k in _RAY_OPTIONS if getattr(args, k, None) is not None]
        raise ValueError(f"{', '.join(given)} need --ray")
    if getattr(args, "threads", None) is not None:
        raise ValueError(f"--threads does not go with --ray: {_NOT_HERE['threads']}")
    gpus = _gpus_per_worker(getattr(args, "device", None), args.gpus_per_worker)
    if getattr(args, "part", "0/1") not in (None, "0/1"):
        raise ValueError(f"--part does not go with --ray: {_NOT_HERE['part']}")
    try:
        require_ray()
    except ImportError as e:
        raise RuntimeError(str(e)) from None
    summary = extract(args.data, args.out, model=args.model, workers=args.workers,
                      gpus_per_worker=gpus, cpus_per_worker=args.cpus_per_worker,
                      address=args.address, progress=not args.no_progress, **_cli_options(args))
    r = summary["ray"]
    return report_run(summary, args, format_summary(summary)
                         + f"\n  on Ray: {r['workers']} workers on {r['nodes']} node(s)"
                         + (f"; {r['lost_workers']} lost, {r['redone_shards']} shard(s) redone"
                            if r["lost_workers"] else ""))

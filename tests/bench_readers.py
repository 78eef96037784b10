"""Read throughput of every reader of a run directory, from a warm page cache.

    python tests/bench_readers.py [--records 20000] [--hidden 576] [--repeats 3]

Builds (once, cached under $TMPDIR/rjepa-bench-readers-*) a run of N
synthetic chains of thought (1-6 steps each) with random latents of the
given hidden size (`rjepa_latent.testing.fake_run`: the store's own files,
as an extraction writes them), exports it to Parquet and npy, then
times a full pass over all latents with each reader, twice per repeat (the
first pass warms the page cache; the second is reported). Prints records/s
and GB/s of latent bytes per reader, median and spread over the repeats.
Not a test: numbers depend on the machine; run it on a quiet one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_run(root: Path, n: int, hidden: int) -> Path:
    import shutil
    import rjepa_latent as rl
    from rjepa_latent.testing import fake_run
    run = root / "run"
    if (run / "manifest.json").exists() and rl.open_latents(run).complete:
        return run
    shutil.rmtree(run, ignore_errors=True)
    # the readers' speed depends on the stored bytes, not on which model computed them
    return fake_run(run, records=n, hidden=hidden, layers=[-2], num_layers=2, steps=(1, 6),
                    shard_size=1000)


def timed(fn) -> tuple[float, int | None]:
    """Seconds of the second of two passes (the first warms the page cache and
    Python's imports), and the units it counted (None: records)."""
    fn()
    t = time.perf_counter()
    units = fn()
    return time.perf_counter() - t, units


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.records <= 0 or args.repeats <= 0 or args.hidden % 64:
        p.error("--records and --repeats must be positive, --hidden a multiple of 64")
    import rjepa_latent as rl
    from rjepa_latent.store import export as rl_export
    root = Path(tempfile.gettempdir()) / f"rjepa-bench-readers-{args.records}-{args.hidden}"
    root.mkdir(exist_ok=True)
    run = build_run(root, args.records, args.hidden)
    store = rl.open_latents(run)
    n = len(store)
    nbytes = sum(int(s["steps"]) for s in store.shards) * args.hidden * 4
    pq_path, npy_dir = root / "run.parquet", root / "npy"
    if not pq_path.exists():
        rl_export.export_parquet(store, pq_path)
    if not (npy_dir / "items.jsonl").exists():
        rl_export.export_npy(store, npy_dir)

    def open_latents_pass():
        for it in rl.open_latents(run):
            it.latents.sum()

    def torch_pass():
        from rjepa_latent.torch import LatentDataset
        ds = LatentDataset(run, layer=-2)
        for i in range(len(ds)):
            ds[i]["latents"].sum()

    def step_pairs_pass():
        from rjepa_latent.torch import StepPairs
        sp = StepPairs(run, layer=-2)
        for i in range(len(sp)):
            sp[i]["z_t"]
        return len(sp)

    def hf_pass():
        ds = rl.open_latents(run).to_hf_dataset(layer=-2).with_format("numpy")
        for batch in ds.iter(batch_size=256):
            for lat in batch["latents"]:
                np.asarray(lat).sum()

    def parquet_pass():
        import pyarrow.parquet as pq
        t = pq.read_table(pq_path, columns=["latents"])
        t.column("latents").combine_chunks().values.values.to_numpy(zero_copy_only=True).sum()

    def npy_pass():
        flat = np.load(npy_dir / "latents.layer-1.npy", mmap_mode="r")
        offs = np.load(npy_dir / "step_offsets.npy")
        for k in range(len(offs) - 1):
            flat[offs[k]:offs[k + 1]].sum()

    passes = {"open_latents (per record)": open_latents_pass, "torch LatentDataset": torch_pass,
              "torch StepPairs (per pair)": step_pairs_pass, "HF datasets numpy (256/batch)": hf_pass,
              "Parquet pyarrow (whole column)": parquet_pass, "npy memmap (per record)": npy_pass}
    print(f"run: {n} records, {nbytes / 1e9:.3f} GB of float32 latents (hidden {args.hidden}); "
          f"{os.cpu_count()} CPUs; median of {args.repeats} warm passes (spread min-max)")
    print(f"{'reader':34s} {'items/s':>12s} {'GB/s':>8s}  spread (items/s)")
    for name, fn in passes.items():
        runs = [timed(fn) for _ in range(args.repeats)]
        ts = [t for t, _ in runs]
        units = runs[0][1] or n     # StepPairs counts pairs; the rest records
        med = statistics.median(ts)
        # GB/s: every latent byte is read once by each pass (pairs read each step twice)
        print(f"{name:34s} {units / med:12,.0f} {nbytes / med / 1e9:8.2f}  "
              f"{units / max(ts):,.0f}-{units / min(ts):,.0f}")
    first_open_cost(run, args.repeats)
    return 0


def first_open_cost(run: Path, repeats: int) -> None:
    """What the integrity checks cost: a reader hashes each shard's payload the first
    time its process maps it; a resume hashes the shards not checked since their commit."""
    import rjepa_latent as rl
    from rjepa_latent.store import integrity
    from rjepa_latent.store.files import read_manifests, listed_shards

    def first_pass(check: str) -> float:
        integrity._seen.clear()   # as in a new process
        t = time.perf_counter()
        for it in rl.open_latents(run, check=check):
            it.latents.sum()
        return time.perf_counter() - t
    first_pass("payload")   # warms the page cache
    checked = statistics.median(first_pass("payload") for _ in range(repeats))
    trusted = statistics.median(first_pass("header") for _ in range(repeats))
    entries = listed_shards(read_manifests(run))
    shard_bytes = sum(i["bytes"] for e in entries.values() for f, i in e["files"].items()
                      if f.endswith(".safetensors"))
    cost = max(checked - trusted, 1e-9)
    print(f"first full pass of a process: {checked:.3f} s with the payload check (the default), "
          f"{trusted:.3f} s with check='header': {cost:.3f} s for {shard_bytes / 1e9:.3f} GB of "
          f"shards ({shard_bytes / cost / 1e9:.2f} GB/s hashed, {cost / len(entries) * 1e3:.2f} ms "
          f"per shard); later passes of the process hash nothing")
    with tempfile.TemporaryDirectory() as notes:
        os.environ[integrity.CACHE_ENV] = notes   # no note yet: a resume hashes every shard
        integrity._seen.clear()
        t = time.perf_counter()
        integrity.unchecked_payloads(run, entries)
        unnoted = time.perf_counter() - t
        integrity._seen.clear()   # a later resume (another process): the notes remain
        t = time.perf_counter()
        integrity.unchecked_payloads(run, entries)
        noted = time.perf_counter() - t
        del os.environ[integrity.CACHE_ENV]
    print(f"resume check of {len(entries)} committed shards: {unnoted:.3f} s hashing every payload "
          f"(files not checked since their commit), {noted:.3f} s when every file is noted as checked")


if __name__ == "__main__":
    sys.exit(main())

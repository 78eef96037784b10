"""Throughput and memory of the token store: the shuffle (`rjepa-latent
tokens`) and `TokenBatches` reads from a warm page cache.

    python tests/bench_tokens.py [--rows 1000000] [--hidden 4096] [--memory-mib 1024]

Builds (once, cached under $TMPDIR/rjepa-bench-tokens-*) a per-token run of
about ROWS token rows of width HIDDEN in bfloat16 (`fake_run`: the store's
own files, random rows), shuffles it into a token store in a child process
(its peak resident memory, VmHWM, is reported), then reads one epoch with
`TokenBatches` twice (the first warms the page cache; the second is timed).
Prints GB/s of row bytes for the shuffle and the read, the shuffle's peak
RSS and the RSS it would have at 10 M rows (the shuffle's memory does not
depend on the number of rows; what does is listed). Not a test: numbers
depend on the machine and its disk; needs about 3x the run's size free.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time, json
from rjepa_latent.store.token_store import build_token_store
t = time.perf_counter()
m = build_token_store(sys.argv[1], sys.argv[2], seed=0, memory_bytes=int(sys.argv[3]))
dt = time.perf_counter() - t
hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0] * 1024
print(json.dumps({"seconds": dt, "hwm": hwm, "rows": m["rows"], "buckets": m["config"]["buckets"]}))
"""

BASE = """
from rjepa_latent.store.token_store import build_token_store
import rjepa_latent as rl, sys
rl.open_latents(sys.argv[1])
print([int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0] * 1024)
"""


def build_run(root: Path, rows: int, hidden: int) -> Path:
    import rjepa_latent as rl
    from rjepa_latent.testing import fake_run
    run = root / "run"
    if (run / "manifest.json").exists() and rl.open_latents(run).complete:
        return run
    shutil.rmtree(run, ignore_errors=True)
    # sample records hold about 160 tokens each; 25 records per shard
    return fake_run(run, records=max(1, rows // 160), per_token=True, layers=[-2], num_layers=2,
                    hidden=hidden, dtype="bfloat16", shard_size=25)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--memory-mib", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4096)
    args = p.parse_args(argv)
    if args.rows <= 0 or args.hidden <= 0 or args.memory_mib <= 0:
        p.error("--rows, --hidden and --memory-mib must be positive")
    root = Path(tempfile.gettempdir()) / f"rjepa-bench-tokens-{args.rows}-{args.hidden}"
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    run = build_run(root, args.rows, args.hidden)
    print(f"source run: {run} ({time.perf_counter() - t:.0f} s to make or find)")
    out = root / "store"
    shutil.rmtree(out, ignore_errors=True)
    res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(run), str(out),
                                     str(args.memory_mib << 20)], capture_output=True, text=True,
                                    check=True).stdout)
    base = int(subprocess.run([sys.executable, "-c", BASE, str(run)], capture_output=True, text=True,
                              check=True).stdout)
    row_bytes = args.hidden * 2
    data = res["rows"] * row_bytes
    gb = 1e9
    print(f"rows {res['rows']:,} x {args.hidden} bf16 = {data / gb:.2f} GB; memory budget "
          f"{args.memory_mib} MiB, {res['buckets']} buckets")
    print(f"shuffle: {res['seconds']:.1f} s, {data / gb / res['seconds']:.3f} GB/s "
          f"(each byte read once, written twice, read once more)")
    print(f"shuffle peak RSS (VmHWM): {res['hwm'] / 2**20:.0f} MiB; of which the opened run (interpreter, "
          f"imports, the run's metadata) {base / 2**20:.0f} MiB")
    from rjepa_latent.torch import TokenBatches
    tb = TokenBatches(out, None, args.batch_size)
    for i in range(2):
        t = time.perf_counter()
        n = sum(len(x) for x in tb)
        dt = time.perf_counter() - t
    print(f"TokenBatches read (warm page cache, batch {args.batch_size}): {n:,} rows in {dt:.2f} s, "
          f"{n * row_bytes / gb / dt:.3f} GB/s")
    tb = TokenBatches(out, None, args.batch_size, shuffle_buffer=4 * 65536)
    for i in range(2):
        t = time.perf_counter()
        n = sum(len(x) for x in tb)
        dt = time.perf_counter() - t
    print(f"TokenBatches read with shuffle_buffer={4 * 65536}: {n * row_bytes / gb / dt:.3f} GB/s")
    print(f"at 10 M rows: the shuffle's buckets and chunk stay as here (peak minus the opened run: "
          f"{(res['hwm'] - base) / 2**20:.0f} MiB); only the opened run's metadata grows, with its items")
    return 0


if __name__ == "__main__":
    sys.exit(main())

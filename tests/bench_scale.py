"""Scale of one extraction run: peak RSS and time per shard at growing record
counts, the cost of all-bad input (every record an error after reading), and
the readers' memory at growing record counts.

    python tests/bench_scale.py [--sizes 20000,200000,2000000] [--bad 20000,40000,80000]
                                [--shard-size 1000] [--threads 1]
                                [--reader-sizes 20000,2000000] [--only readers]

Readers: a finished run of tiny records (hidden 8, two steps each) written
through the store's writer without a model (`scale_runs.write_scale_run`; the
time it takes is printed), then each reader operation (open, 2,000 lookups by
id, full iteration, info, verify, export to Parquet, npy and an HF Dataset) in
a fresh process: its peak RSS above the process's RSS after imports. Target:
the largest run within 100 MiB of the smallest for each operation.

Each run is a fresh `extract_dataset` in its own process, its Model loaded
first and the peak RSS (VmHWM) reset after that, so the peak is the run's own, over tiny generated records (a question and two short steps)
with a tiny random Llama this script builds (CPU). Time per shard is taken
between the first and the last journal entry's commit (steady state, without
start-up; the median gap between consecutive commits, and the mean). Targets: the largest run's peak RSS within 50 MiB of the smallest
one's, time per shard flat within 15%; all-bad input linear in its size
(shards commit in O(1), errors.jsonl written once). Not a test: numbers
depend on the machine; each row is compared with the first row of its table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import json, sys, time
import rjepa_latent as rl
data, model, out, shard, threads, max_tokens = sys.argv[1:7]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024   # kB -> MiB

m = rl.Model(model, device="cpu", threads=int(threads))   # loaded first: its peak is not the run's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                           # reset VmHWM (the peak RSS) to now
base = status("VmRSS")
t = time.perf_counter()
s = rl.extract_dataset(data, m, out, shard_size=int(shard), layers=(1,), progress=False,
                       max_tokens=None if max_tokens == "-" else int(max_tokens))
print(json.dumps({"wall_s": time.perf_counter() - t, "items": s["items"], "errors": s["errors"],
                  "rss_mib": status("VmHWM"), "base_mib": base, "end_mib": status("VmRSS")}))
"""


def write_records(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'{{"id": "r{i}", "question": "what is {i % 97} plus {i % 89}?", '
                    f'"steps": ["add the two", "the sum is {i % 97 + i % 89}"]}}\n')


def run_one(data: Path, model: Path, out: Path, shard: int, threads: int, max_tokens: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    r = subprocess.run([sys.executable, "-c", CHILD, str(data), str(model), str(out), str(shard),
                        str(threads), max_tokens], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    entries = sorted(out.glob("shard-*.json"), key=lambda p: p.stat().st_mtime_ns)
    res["shards"] = len(entries)
    t = [p.stat().st_mtime_ns / 1e9 for p in entries]
    gaps = sorted(b - a for a, b in zip(t, t[1:]))
    # the median gap between consecutive commits: steady state, robust to other load's bursts
    res["s_per_shard"] = gaps[len(gaps) // 2] if gaps else float("nan")
    res["mean_s_per_shard"] = (t[-1] - t[0]) / len(gaps) if gaps else float("nan")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,200000,2000000")
    ap.add_argument("--bad", default="20000,40000,80000")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reader-sizes", default="20000,2000000")
    ap.add_argument("--only", choices=["extract", "readers"], default=None)
    args = ap.parse_args()
    if args.only != "extract":
        readers(args)
    if args.only != "readers":
        extraction(args)


def readers(args) -> None:
    import time
    from scale_runs import OPERATIONS, reader_peak_mib, write_scale_run
    sizes = [int(x) for x in args.reader_sizes.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="rjepa-bench-readers-") as tmp:
        print(f"reader peak RSS above the process after imports, MiB ({args.shard_size} records a shard)")
        print(f"{'records':>10} {'write s':>8} " + " ".join(f"{w:>9}" for w in OPERATIONS))
        first = None
        for n in sizes:
            t = time.perf_counter()
            run = write_scale_run(Path(tmp) / f"run{n}", n, shard_size=args.shard_size)
            wrote = time.perf_counter() - t
            peaks = {w: reader_peak_mib(run, w, n) for w in OPERATIONS}
            first = first or peaks
            print(f"{n:>10,} {wrote:>8.1f} " + " ".join(f"{peaks[w]:>9.1f}" for w in OPERATIONS), flush=True)
            if peaks is not first:
                print(f"{'vs first':>19} " + " ".join(f"{peaks[w] - first[w]:>+9.1f}" for w in OPERATIONS),
                      flush=True)
            subprocess.run(["rm", "-rf", str(run)], check=True)
        print()


def extraction(args) -> None:
    from conftest import build_tiny_model
    with tempfile.TemporaryDirectory(prefix="rjepa-bench-scale-") as tmp:
        root = Path(tmp)
        model = build_tiny_model("llama", root / "model")
        print(f"records x shard_size {args.shard_size}, tiny random Llama, CPU, {args.threads} thread(s)")
        print(f"{'records':>10} {'shards':>7} {'wall s':>8} {'s/shard':>9} {'vs first':>9} "
              f"{'mean':>8} {'peak RSS MiB':>13} {'vs first':>9}")
        first = None
        for n in [int(x) for x in args.sizes.split(",") if x]:
            data = root / f"d{n}.jsonl"
            write_records(data, n)
            r = run_one(data, model, root / f"run{n}", args.shard_size, args.threads, "-")
            first = first or r
            print(f"{n:>10,} {r['shards']:>7} {r['wall_s']:>8.1f} {r['s_per_shard']:>9.4f} "
                  f"{r['s_per_shard'] / first['s_per_shard']:>8.2f}x {r['mean_s_per_shard']:>8.4f} "
                  f"{r['rss_mib']:>13.1f} "
                  f"{r['rss_mib'] - first['rss_mib']:>+8.1f}M", flush=True)
            data.unlink()
            subprocess.run(["rm", "-rf", str(root / f"run{n}")], check=True)
        print("\nall-bad input (every record over --max-tokens 2: an error after reading)")
        print(f"{'records':>10} {'wall s':>8} {'vs first':>9} {'x size':>7}")
        first = None
        for n in [int(x) for x in args.bad.split(",") if x]:
            data = root / f"bad{n}.jsonl"
            write_records(data, n)
            r = run_one(data, model, root / f"bad{n}", args.shard_size, args.threads, "2")
            assert r["items"] == 0 and r["errors"] == n, r
            first = first or (n, r)
            print(f"{n:>10,} {r['wall_s']:>8.2f} {r['wall_s'] / first[1]['wall_s']:>8.2f}x "
                  f"{n / first[0]:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()

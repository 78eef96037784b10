"""Benchmark of `extract --ray` on the machine it runs on: records/s and scaling
efficiency for 1, 2, ... CPU workers on a local Ray cluster and on a simulated
two-node cluster (`ray.cluster_utils.Cluster`), the single-process CLI in the
same run as the peer, and Ray's overhead per job (init + pool start + shutdown).

    PYTHONPATH=$PWD python tests/bench_ray.py [--records 400] [--shard-size 20]
        [--max-workers N] [--model PATH]

Without --model a random Llama (hidden 256, 4 layers, the tests' tokenizer) is
made in a temporary directory, so nothing is downloaded. Every Ray run's
directory is checked byte for byte against the CLI's. Rates:
- "job": records / the whole extract call (pool start included);
- "steady": records committed after the first shard / the time from the first
  commit to the last (the pool at work, start-up excluded).
Efficiency of n workers = steady(n) / (n x steady(1)); the CLI's peer rates
are its own (one process, --threads 1 and --threads all).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GSM8K = ROOT.parents[1] / "shared" / "data" / "gsm8k" / "test.jsonl"


def make_model(out: Path) -> Path:
    import torch
    import transformers as T
    from conftest import _randomize, make_tokenizer
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320, max_position_embeddings=2048,
                        rms_norm_eps=1e-5, tie_word_embeddings=True)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed=1)
    model.save_pretrained(out)
    make_tokenizer(out / "tokenizer.json")
    return out


def make_data(path: Path, n: int) -> None:
    rows = []
    if GSM8K.is_file():
        with open(GSM8K, encoding="utf-8") as f:
            for i, line in enumerate(f):
                rows.append({"id": f"g{i}", **json.loads(line)})
    while len(rows) < n:   # synthetic records after the real ones
        i = len(rows)
        rows.append({"id": f"s{i}", "question": f"Tom has {i} apples and buys {i % 7 + 3} more. How many?",
                     "answer": f"He buys {i % 7 + 3}.\nHe has {i} + {i % 7 + 3} = {i + i % 7 + 3}.\n#### {i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]), encoding="utf-8")


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def cli(data: Path, model: Path, out: Path, shard: int, threads: int) -> tuple[float, float]:
    """(wall of the process, extract's own wall_s) of one single-process CLI run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rjepa_latent.cli", "extract", str(data), "--model", str(model),
                        "--out", str(out), "--shard-size", str(shard), "--device", "cpu", "--threads",
                        str(threads), "--no-progress"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    m = re.search(r" in ([0-9.]+) s:", r.stdout)
    return wall, float(m.group(1)) if m else wall


def ray_run(data: Path, model: Path, out: Path, shard: int, workers: int, cpus: float) -> dict:
    from rjepa_latent.ray import extract
    times: list[tuple[float, int]] = []
    t = time.perf_counter()
    s = extract([str(data)], out, model=str(model), shard_size=shard, workers=workers, cpus_per_worker=cpus,
                progress=False,
                on_shard=lambda i: times.append((time.perf_counter(), i["records"][1] - i["records"][0])))
    job = time.perf_counter() - t
    steady = (sum(n for _, n in times[1:]) / (times[-1][0] - times[0][0])) if len(times) > 1 else float("nan")
    return {"job_s": job, "records": s["records"], "steady": steady, "nodes": s["ray"]["nodes"],
            "per_worker": sorted(s["ray"]["shards_per_worker"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--shard-size", type=int, default=20)
    ap.add_argument("--max-workers", type=int, default=os.cpu_count())
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    import logging

    import ray
    from ray.cluster_utils import Cluster
    cores = os.cpu_count()
    nmax = max(1, a.max_workers)
    cpus = max(1, cores // nmax)   # CPUs per worker: n workers never share a core
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        model = Path(a.model) if a.model else make_model(tmp / "model")
        data = tmp / "data.jsonl"
        make_data(data, a.records)
        rows = []
        ref = None
        for threads in sorted({1, cores}):
            out = tmp / f"cli-{threads}"
            wall, inner = cli(data, model, out, a.shard_size, threads)
            ref = ref or snapshot(out)
            rows.append((f"CLI, one process, --threads {threads}", a.records / inner, a.records / wall, "", "", 1))

        # overhead of one job: init + pool start (+ a 1-record shard) + shutdown
        one = tmp / "one.jsonl"
        make_data(one, 1)
        t = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        init_s = time.perf_counter() - t
        tiny = ray_run(one, model, tmp / "tiny", a.shard_size, 1, cpus)
        t = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        base = None
        for n in range(1, nmax + 1):
            out = tmp / f"ray-{n}"
            r = ray_run(data, model, out, a.shard_size, n, cpus)
            assert snapshot(out) == ref, f"ray with {n} workers: other bytes than the CLI"
            base = base or r["steady"]
            rows.append((f"Ray local, {n} worker(s) x {cpus} CPU", r["steady"], a.records / r["job_s"],
                         f"{r['steady'] / (n * base):.0%}", "/".join(map(str, r["per_worker"])), r["nodes"]))
        ray.shutdown()

        if cores >= 2:
            half = cores // 2
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": half, "include_dashboard": False})
            cluster.add_node(num_cpus=half)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
            try:
                out = tmp / "ray-2nodes"
                r = ray_run(data, model, out, a.shard_size, 2, half)
                assert snapshot(out) == ref, "ray on two nodes: other bytes than the CLI"
                rows.append((f"Ray, 2 simulated nodes, 2 workers x {half} CPU", r["steady"],
                             a.records / r["job_s"], f"{r['steady'] / (2 * base):.0%}",
                             "/".join(map(str, r["per_worker"])), r["nodes"]))
            finally:
                ray.shutdown()
                cluster.shutdown()

    print(f"\n{a.records} records, shard size {a.shard_size}, {cores} cores "
          f"({os.uname().machine}), model {'random Llama 256x4' if not a.model else a.model}")
    print(f"{'run':48s} {'rec/s steady':>12s} {'rec/s job':>10s} {'scaling':>8s} {'shards/worker':>14s} nodes")
    for name, steady, job, eff, per, nodes in rows:
        print(f"{name:48s} {steady:12.1f} {job:10.1f} {eff:>8s} {per:>14s} {nodes:5d}")
    print(f"\nRay overhead per job: init {init_s:.1f} s + pool start, a 1-record shard and pool teardown "
          f"{tiny['job_s']:.1f} s + shutdown {shutdown_s:.1f} s = {init_s + tiny['job_s'] + shutdown_s:.1f} s")
    print("(CLI: 'steady' = records / extract_dataset's own wall_s, model load included, interpreter "
          "start excluded; 'job' = records / the whole process)")


if __name__ == "__main__":
    main()

"""CPU benchmark: this engine's own GEMM on every ISA this CPU runs, OpenBLAS
(with and without OPENBLAS_CORETYPE=Haswell), and HF transformers (input
order and length-sorted), for the default model (SmolLM2-135M) and a random
model of the Llama-3.2-1B shape; the GEMMs' GFLOP/s against the CPU's FMA peak.

    python tests/bench_cpu.py [--data test.jsonl] [--n-seqs 64] [--repeats 3]
                              [--layers-1b 16] [--skip-1b] [--generic] [--json OUT]

Each configuration is one `rjepa-latent bench` run in a subprocess (the
environment variables that pick the GEMM are read when a model is created),
with RJEPA_CPU_PROFILE=1 so the engine reports the time its GEMMs took. HF
runs in the first configuration's process; the ratios compare numbers of
runs made one after the other on the same machine, so run it on a quiet one.

Peak = cores x GHz x FMA units per core x lanes (8 fp32 for AVX2, 16 for
AVX-512) x 2 flops per FMA. GHz is read from /proc/cpuinfo ("cpu MHz", the
current clock; give --ghz for the sustained all-core clock) and FMA units
default to 2 (two 256-bit FMA pipes: Haswell and later, Zen 2 and later;
Zen 4 runs AVX-512 on the same two 256-bit pipes, so give --avx512-lanes 8
there). The 1B-shape model is written with random weights into a temporary
directory (about 5 GB of fp32 at 16 layers) and deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=True)
PROFILE_RE = re.compile(r"gemm ([0-9.]+) s \(([0-9.]+)%\).*gemm ([0-9.]+) GFLOP/s over ([0-9.]+) GFLOP")


def write_1b(directory: str, layers: int) -> None:
    import torch
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=layers, **LLAMA_1B)
    with torch.device("cpu"):
        model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory)


def cpu_ghz() -> float:
    try:
        mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
        return max(mhz) / 1000.0 if mhz else 0.0
    except OSError:
        return 0.0


def openblas_core_of_numpy() -> str:
    """What OpenBLAS core numpy's OpenBLAS picked (threadpoolctl), when installed."""
    try:
        from threadpoolctl import threadpool_info
        import numpy  # noqa: F401  (loads its BLAS)
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                     for i in threadpool_info() if i.get("user_api") == "blas") or "none"


def run_bench(model: str | None, env_over: dict, args, hf: bool, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RJEPA_CPU_ISA", "RJEPA_GEMM", "OPENBLAS_CORETYPE")}
    env.update(env_over, RJEPA_CPU_PROFILE="1")
    cmd = [sys.executable, "-m", "rjepa_latent.cli", "bench", "--n-seqs", str(args.n_seqs),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--json", str(out),
           "--no-progress"]
    if args.data:
        cmd += ["--data", args.data]
    if model:
        cmd += ["--model", model]
    if not hf:
        cmd.append("--no-hf")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    m = PROFILE_RE.search(r.stderr)
    if m:
        res["gemm_share"] = float(m.group(2)) / 100.0
        res["gemm_gflops"] = float(m.group(3))
    res["profile"] = next((l for l in r.stderr.splitlines() if "CPU profile" in l), "")
    return res


def configs(args) -> list[tuple[str, dict]]:
    import rjepa_latent as rl
    isas = [i for i in rl.build_info()["cpu_isas"].split() if i != "generic" or args.generic]
    out = [(f"own GEMM, {i}", {"RJEPA_CPU_ISA": i}) for i in isas]
    if rl.build_info()["blas"].startswith("scipy-openblas32"):
        out += [("OpenBLAS, its own core choice", {"RJEPA_GEMM": "openblas"}),
                ("OpenBLAS, OPENBLAS_CORETYPE=Haswell",
                 {"RJEPA_GEMM": "openblas", "OPENBLAS_CORETYPE": "Haswell"})]
    return out


def bench_model(name: str, path: str | None, args, tmp: Path) -> list[dict]:
    rows = []
    for i, (label, env) in enumerate(configs(args)):
        print(f"[{name}] {label} ...", file=sys.stderr, flush=True)
        r = run_bench(path, env, args, hf=i == 0 and not args.no_hf, out=tmp / f"{name}-{i}.json")
        r.update(runner=label, model_label=name)
        rows.append(r)
    return rows


def peak_gflops(args, isa: str) -> float:
    lanes = args.avx512_lanes if isa == "avx512" else 8 if isa == "avx2" else 1
    return args.threads * args.ghz * args.fma_units * lanes * 2


def report(rows: list[dict], args) -> str:
    lines = [f"threads {args.threads}; peak = {args.threads} cores x {args.ghz:.2f} GHz x "
             f"{args.fma_units} FMA units x lanes (avx2 8, avx512 {args.avx512_lanes}) x 2; "
             f"numpy's OpenBLAS: {openblas_core_of_numpy()}", ""]
    for model in dict.fromkeys(r["model_label"] for r in rows):
        rs = [r for r in rows if r["model_label"] == model]
        hf = next((r for r in rs if "hf_tokens_per_s" in r), None)
        lines += [f"## {model}: {rs[0]['workload']}", "",
                  "| runner | tokens/s | vs HF input order | vs HF length-sorted | GEMM GFLOP/s "
                  "| % of FMA peak | GEMM share of op time |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            tps = r["engine_tokens_per_s"]
            isa = r["runner"].split(", ")[-1] if r["runner"].startswith("own") else "avx2"
            g = r.get("gemm_gflops", 0.0)
            pk = peak_gflops(args, isa)
            vs = (f"{tps / hf['hf_tokens_per_s']:.2f}x | {tps / hf['hf_sorted_tokens_per_s']:.2f}x"
                  if hf else "- | -")
            lines.append(f"| {r['runner']} ({r['kernel'][:60]}) | {tps:.0f} | {vs} | {g:.1f} | "
                         f"{100 * g / pk if pk else 0:.0f}% | {100 * r.get('gemm_share', 0):.0f}% |")
        if hf:
            lines.append(f"| HF transformers, input order | {hf['hf_tokens_per_s']:.0f} | 1.00x | | | | |")
            lines.append(f"| HF transformers, length-sorted | {hf['hf_sorted_tokens_per_s']:.0f} | | "
                         f"1.00x | | | |")
        lines += ["", f"load average at the end: {rs[-1]['load_average']:.1f}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(GSM8K) if GSM8K.exists() else None,
                   help="records to run (default: GSM8K test.jsonl next to the repository, "
                        "else the package's samples)")
    p.add_argument("--n-seqs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layers-1b", type=int, default=16, help="layers of the 1B-shape model (16)")
    p.add_argument("--n-seqs-1b", type=int, default=16, help="sequences for the 1B-shape model")
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--generic", action="store_true", help="also time the portable kernel")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--ghz", type=float, default=cpu_ghz())
    p.add_argument("--fma-units", type=int, default=2)
    p.add_argument("--avx512-lanes", type=int, default=16)
    p.add_argument("--json", help="also write all rows as JSON")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rjepa-bench-cpu-") as d:
        tmp = Path(d)
        rows += bench_model("SmolLM2-135M", None, args, tmp)
        if not args.skip_1b:
            path = tmp / "llama-1b-shape"
            print(f"writing a random Llama-3.2-1B-shape model ({args.layers_1b} layers) ...",
                  file=sys.stderr, flush=True)
            write_1b(str(path), args.layers_1b)
            n = args.n_seqs
            args.n_seqs = args.n_seqs_1b
            rows += bench_model(f"Llama-3.2-1B shape, random, {args.layers_1b} layers", str(path),
                                args, tmp)
            args.n_seqs = n
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

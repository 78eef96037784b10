"""CPU benchmark: this engine's own GEMM on every ISA this CPU runs, OpenBLAS
(with and without OPENBLAS_CORETYPE=Haswell), and HF transformers (input
order and length-sorted), for the default model (SmolLM2-135M) and a random
model of the Llama-3.2-1B shape; the GEMMs' GFLOP/s against the CPU's FMA peak;
with --llama-cpp, llama.cpp's prompt processing of the same texts beside them.

    python tests/bench_cpu.py [--data test.jsonl] [--n-seqs 64] [--repeats 3]
                              [--layers-1b 16] [--skip-1b] [--generic] [--json OUT]
                              [--llama-cpp off|auto|PATH]

Each configuration is one `rjepa-latent bench` run in a subprocess (the
environment variables that pick the GEMM are read when a model is created),
with RJEPA_CPU_PROFILE=1 so the engine reports the time its GEMMs took. HF
runs in the first configuration's process; the ratios compare numbers of
runs made one after the other on the same machine, so run it on a quiet one.

The FMA peak is measured: a small C program (compiled with the system's cc,
OpenMP, one per thread) runs 12 independent chains of vector FMAs per ISA
(AVX2 and AVX-512 where the CPU has them) on the bench's thread count, which
is what the CPU sustains with its turbo on this many cores. With --ghz the
nominal formula is used instead: cores x GHz x FMA units per core x lanes (8
fp32 for AVX2, 16 for AVX-512) x 2 flops per FMA (FMA units default to 2: two
256-bit FMA pipes, Haswell and later, Zen 2 and later; Zen 4 runs AVX-512 on
the same two 256-bit pipes, so give --avx512-lanes 8 there). The 1B-shape model is written with random weights into a temporary
directory (about 5 GB of fp32 at 16 layers) with the default model's
tokenizer (so both models run the same GSM8K texts) and deleted afterwards.

llama.cpp (--llama-cpp; `auto` builds it into the cache when absent, see
tests/peer_llama_cpp.py): `llama-embedding` (mean pooling, every text, batches of
up to 2048 tokens like ours, the best of ubatch 256/512/2048, each size run
before and after this engine's runs) on the same texts with the same threads,
timed from its first batch to its end, on GGUF files of the same weights cut
to the layers our job runs (layer -2 of 30 needs 29): F32 (the default model's
Q4_1 file dequantized with gguf-py; the 1B-shape model written from the same
tensors) and, for the default model, its Q4_1 file as stored. The script
checks that llama.cpp tokenized every text into the same ids as we did.
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

import peer_llama_cpp as llama_cpp

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=True)
PROFILE_RE = re.compile(r"gemm ([0-9.]+) s \(([0-9.]+)%\).*gemm ([0-9.]+) GFLOP/s over ([0-9.]+) GFLOP")


def write_1b(directory: str, layers: int, tokenizer, gguf_path: str | None) -> None:
    """The random model as an HF checkpoint with `tokenizer`, and (`gguf_path`)
    its first layers - 1 blocks as an F32 GGUF for llama.cpp, with the
    default model's vocabulary padded to the model's."""
    import torch
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=layers, **LLAMA_1B)
    with torch.device("cpu"):
        model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    if gguf_path:
        write_llama_gguf(model, gguf_path, layers - 1)


def write_llama_gguf(model, path: str, keep: int) -> None:
    """An HF Llama's first `keep` blocks as an F32 GGUF in llama.cpp's layout."""
    import gguf
    import numpy as np
    from rjepa_latent.checkpoints.default_model import default_model_path
    c = model.config
    head_dim = c.head_dim
    theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]   # transformers 5
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(keep)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    llama_cpp.write_fields(w, llama_cpp.padded_vocab(default_model_path(), c.vocab_size))
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    sd = model.model.state_dict()
    w.add_tensor("token_embd.weight", sd["embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["norm.weight"].numpy())
    for i in range(keep):
        for hf, g in names.items():
            a = sd[f"layers.{i}.{hf}.weight"].numpy()
            if g in heads:   # llama.cpp's converter interleaves q/k rows within each head
                n = heads[g]
                a = np.ascontiguousarray(a.reshape(n, 2, a.shape[0] // n // 2, a.shape[1])
                                         .swapaxes(1, 2).reshape(a.shape))
            w.add_tensor(f"blk.{i}.{g}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


FMA_LOOP = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#define CHAINS 12
__attribute__((target("avx512f"))) static float run512(long n)
{
    __m512 a[CHAINS], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm512_set1_ps((float)i);
    for (long k = 0; k < n; k++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(a[i]);
    return s;
}
__attribute__((target("avx2,fma"))) static float run256(long n)
{
    __m256 a[CHAINS], b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm256_set1_ps((float)i);
    for (long k = 0; k < n; k++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
    float t[8], s = 0;
    for (int i = 0; i < CHAINS; i++) {
        _mm256_storeu_ps(t, a[i]);
        for (int j = 0; j < 8; j++) s += t[j];
    }
    return s;
}
int main(int argc, char **argv)
{
    int threads = atoi(argv[1]);
    for (int wide = 0; wide < 2; wide++) {
        if (wide ? !__builtin_cpu_supports("avx512f") : !__builtin_cpu_supports("fma")) continue;
        long n = wide ? 50000000 : 100000000;
        double best = 0, sink = 0;
        for (int rep = 0; rep < 3; rep++) {
            double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
            sink += wide ? run512(n) : run256(n);
            double flops = (double)threads * n * CHAINS * (wide ? 16 : 8) * 2;
            double g = flops / (omp_get_wtime() - t0) * 1e-9;
            if (g > best) best = g;
        }
        printf("%s %.1f %d\n", wide ? "avx512" : "avx2", best, sink != 0.0);
    }
    return 0;
}
"""


def measured_peak(threads: int) -> dict[str, float]:
    """GFLOP/s of independent FMA chains per ISA on `threads` threads, or {}
    when the program cannot be built here (no cc, not x86-64)."""
    import shutil
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return {}
    with tempfile.TemporaryDirectory(prefix="rjepa-fma-") as d:
        src, exe = Path(d) / "fma.c", Path(d) / "fma"
        src.write_text(FMA_LOOP)
        r = subprocess.run([cc, "-O3", "-funroll-loops", "-fopenmp", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return {}
        r = subprocess.run([str(exe), str(threads)], capture_output=True, text=True)
    return {line.split()[0]: float(line.split()[1]) for line in r.stdout.splitlines()}


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


def bench_model(name: str, path: str | None, args, tmp: Path, llama=None,
                ggufs: list[tuple[str, str]] = ()) -> list[dict]:
    """Our configurations; with `llama`, llama.cpp on each (label, GGUF) of
    `ggufs` over the same texts, each ubatch size run before and after ours."""
    lrows: dict[str, list] = {}

    def llama_round() -> None:
        for label, g in ggufs:
            print(f"[{name}] llama.cpp {label} ...", file=sys.stderr, flush=True)
            lrows.setdefault(label, []).extend(
                llama.best_embed(g, texts, threads=args.threads, ubatches=args.ubatches)[1])

    if llama is not None:
        texts, ids, _ = llama_cpp.workload_texts(args.data, args.tokenizer, args.n_seqs, None)
        llama_round()
    rows = []
    for i, (label, env) in enumerate(configs(args)):
        print(f"[{name}] {label} ...", file=sys.stderr, flush=True)
        r = run_bench(path, env, args, hf=i == 0 and not args.no_hf, out=tmp / f"{name}-{i}.json")
        r.update(runner=label, model_label=name)
        rows.append(r)
    if llama is not None:
        llama_round()
        for label, runs in lrows.items():
            best = max(runs, key=lambda r: r.tokens_per_s)
            rows.append({"runner": f"llama.cpp {label}", "model_label": name, "llama": True,
                         "engine_tokens_per_s": best.tokens_per_s, "ubatch": best.ubatch,
                         "spread": [min(r.tokens_per_s for r in runs),
                                    max(r.tokens_per_s for r in runs)],
                         "runs": [(r.ubatch, r.tokens_per_s) for r in runs],
                         "tokens": best.tokens, "version": llama.version,
                         "tokens_check": llama_cpp.check_tokens(best, ids),
                         "load_average": os.getloadavg()[0]})
            if "F32" in label:   # the synthetic check: one sequence of random tokens
                rows[-1]["llama_bench_pp512"] = llama.bench(dict(ggufs)[label], 512,
                                                            threads=args.threads, repeats=2)
            if rows[0]["tokens"] != best.tokens:
                rows[-1]["tokens_check"] += (f"; the bench's workload has {rows[0]['tokens']} "
                                             f"tokens, llama.cpp processed {best.tokens}")
    return rows


def peak_gflops(args, isa: str) -> float:
    if args.ghz is None:   # measured; the portable kernel and OpenBLAS rows against AVX2's
        return args.peak.get(isa, args.peak.get("avx2", 0.0))
    lanes = args.avx512_lanes if isa == "avx512" else 8 if isa == "avx2" else 1
    return args.threads * args.ghz * args.fma_units * lanes * 2


def report(rows: list[dict], args) -> str:
    if args.ghz is None:
        how = ("measured FMA peak on " + f"{args.threads} threads: " +
               (", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in args.peak.items())
                or "could not be measured (no C compiler?): give --ghz"))
    else:
        how = (f"peak = {args.threads} cores x {args.ghz:.2f} GHz x {args.fma_units} FMA units x "
               f"lanes (avx2 8, avx512 {args.avx512_lanes}) x 2")
    lines = [f"threads {args.threads}; {how}; numpy's OpenBLAS: {openblas_core_of_numpy()}", ""]
    for model in dict.fromkeys(r["model_label"] for r in rows):
        rs = [r for r in rows if r["model_label"] == model and not r.get("llama")]
        lm = [r for r in rows if r["model_label"] == model and r.get("llama")]
        ref = next((r for r in lm if "F32" in r["runner"]), None)
        vl = "| vs llama.cpp F32 " if ref else ""
        hf = next((r for r in rs if "hf_tokens_per_s" in r), None)
        lines += [f"## {model}: {rs[0]['workload']}", "",
                  "| runner | tokens/s | vs HF input order | vs HF length-sorted | GEMM GFLOP/s "
                  f"| % of FMA peak | GEMM share of op time {vl}|",
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if ref else "")]
        for r in rs:
            tps = r["engine_tokens_per_s"]
            # OpenBLAS's own core choice uses the widest ISA it has kernels for
            isa = (r["runner"].split(", ")[-1] if r["runner"].startswith("own")
                   else "avx2" if "Haswell" in r["runner"] else "avx512")
            g = r.get("gemm_gflops", 0.0)
            pk = peak_gflops(args, isa)
            vs = (f"{tps / hf['hf_tokens_per_s']:.2f}x | {tps / hf['hf_sorted_tokens_per_s']:.2f}x"
                  if hf else "- | -")
            vr = f" {tps / ref['engine_tokens_per_s']:.2f}x |" if ref else ""
            lines.append(f"| {r['runner']} ({r['kernel'][:60]}) | {tps:.0f} | {vs} | {g:.1f} | "
                         f"{100 * g / pk if pk else 0:.0f}% | {100 * r.get('gemm_share', 0):.0f}% |"
                         + vr)
        blank = " |" if ref else ""
        if hf:
            lines.append(f"| HF transformers, input order | {hf['hf_tokens_per_s']:.0f} | 1.00x | | | | |"
                         + blank)
            lines.append(f"| HF transformers, length-sorted | {hf['hf_sorted_tokens_per_s']:.0f} | | "
                         f"1.00x | | | |" + blank)
        best = max(rs, key=lambda r: r["engine_tokens_per_s"])
        for r in lm:
            tps = r["engine_tokens_per_s"]
            vs = (f"{tps / hf['hf_tokens_per_s']:.2f}x | {tps / hf['hf_sorted_tokens_per_s']:.2f}x"
                  if hf else "- | -")
            lines.append(f"| {r['runner']} (ubatch {r['ubatch']}; ours best / this: "
                         f"{best['engine_tokens_per_s'] / tps:.2f}x) | {tps:.0f} | {vs} | | | |"
                         + (f" {tps / ref['engine_tokens_per_s']:.2f}x |" if ref else ""))
        lines += [""]
        if lm:
            lines += [f"llama.cpp {lm[0]['version']}: llama-embedding, mean pooling, 2048-token "
                      "batches, timed from its first batch to its end (its log's time stamps), "
                      "GOMP_SPINCOUNT=0 as ours; each row the best of ubatch "
                      f"{'/'.join(map(str, args.ubatches))} run before and after ours "
                      "(tokens/s of all its runs: "
                      + "; ".join(f"{r['runner'][10:]} {r['spread'][0]:.0f}-{r['spread'][1]:.0f}"
                                  for r in lm) + ")"]
            lines += [f"{r['runner']}: {r['tokens_check']}" for r in lm]
            lines += [f"{r['runner']}: llama-bench -p 512 -n 0 (synthetic, one sequence of random "
                      f"tokens, mean of 2): {r['llama_bench_pp512']:.0f} tokens/s"
                      for r in lm if "llama_bench_pp512" in r] + [""]
        lines += [f"load average at the end: {(lm or rs)[-1]['load_average']:.1f}", ""]
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
    p.add_argument("--ghz", type=float, default=None,
                   help="use the nominal peak at this clock instead of measuring it")
    p.add_argument("--fma-units", type=int, default=2)
    p.add_argument("--avx512-lanes", type=int, default=16)
    p.add_argument("--json", help="also write all rows as JSON")
    p.add_argument("--llama-cpp", default="off", metavar="off|auto|PATH",
                   help="also run llama.cpp on the same texts: a llama.cpp build directory, or "
                        "auto (the cached build, else build one from the llama-cpp-python sdist: "
                        "needs cmake, a C++ compiler and minutes); default off")
    p.add_argument("--ubatches", default="256,512,2048",
                   type=lambda s: [int(x) for x in s.split(",")],
                   help="llama.cpp ubatch sizes to try (best kept)")
    args = p.parse_args(argv)
    args.peak = measured_peak(args.threads) if args.ghz is None else {}
    try:
        llama = llama_cpp.find_or_build(args.llama_cpp)
    except ValueError as e:
        p.error(str(e))
    import rjepa_latent as rl
    from rjepa_latent.tools.bench import default_data
    args.data = args.data or default_data()   # what `rjepa-latent bench` reads without --data
    from rjepa_latent.checkpoints.default_model import default_model_path
    default = rl.Model(default_model_path(), device="cpu", threads=1)
    args.tokenizer, n_layers = default.tokenizer, default.config["num_layers"]
    default.close()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rjepa-bench-cpu-") as d:
        tmp = Path(d)
        ggufs = []
        if llama is not None:
            print("writing the default model's GGUF as F32, and both cut to the layers of "
                  "layer -2 ...", file=sys.stderr, flush=True)
            keep = n_layers - 1
            for label, f32 in ((f"F32, {keep} of {n_layers} layers", True),
                               (f"Q4_1 as stored, {keep} of {n_layers} layers", False)):
                g = tmp / f"smollm2-{'f32' if f32 else 'q4_1'}.gguf"
                llama_cpp.rewrite_gguf(default_model_path(), g, f32=f32, layers=keep)
                ggufs.append((label, str(g)))
        rows += bench_model("SmolLM2-135M", None, args, tmp, llama, ggufs)
        for _, g in ggufs:
            os.unlink(g)
        if not args.skip_1b:
            path = tmp / "llama-1b-shape"
            print(f"writing a random Llama-3.2-1B-shape model ({args.layers_1b} layers) ...",
                  file=sys.stderr, flush=True)
            g = str(tmp / "llama-1b-shape-f32.gguf") if llama is not None else None
            write_1b(str(path), args.layers_1b, args.tokenizer, g)
            n = args.n_seqs
            args.n_seqs = args.n_seqs_1b
            rows += bench_model(f"Llama-3.2-1B shape, random, {args.layers_1b} layers", str(path),
                                args, tmp, llama,
                                [(f"F32, {args.layers_1b - 1} of {args.layers_1b} layers", g)]
                                if g else [])
            args.n_seqs = n
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

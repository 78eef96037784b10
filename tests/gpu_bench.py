"""GPU benchmark: this engine vs HF transformers on a Qwen3-8B-shaped model.

On a machine with an NVIDIA GPU (tests/gpu_check.sh runs it as its last stage):
    python3 tests/gpu_bench.py [--quick] [--json PATH] [--model-dir DIR] [--prepare]
Time: gpu_check.sh gives it what is left of its budget (at least 60 s, with
--quick below 240 s) and gives writing the 16 GB checkpoint the first time
(--prepare) up to 200 s beside the build; --quick measures fewer texts and HF
settings.

What it measures, in one process, on one GPU:
- the cuBLAS bf16 GEMM rate (torch matmul 8192^3, random data): the ceiling;
- a random-weight checkpoint with the exact Qwen3-8B shape (hidden 4096, 36
  layers, 32 heads, 8 kv heads, head_dim 128, intermediate 12288, vocab
  151936, q/k norm; embeddings tied so no lm_head tensor is written, which
  changes no hidden state), written as sharded bf16 safetensors by this
  script (random bf16 drawn on the GPU, streamed to disk; no 16 GB torch model
  is materialised) once per shape: it is cached under
  $RJEPA_BENCH_CACHE (default <tmp>/rjepa_bench_cache) in a directory named
  by a hash of the shape, written to a temporary name and renamed when
  complete, and reused by later runs (--model-dir names another place);
- two length distributions of token sequences: GSM8K-like (mean ~150) and
  MATH-like (mean ~400), each split into reasoning steps; the job is layer -2
  mean-pooled per step;
- this engine: load time, tokens/s, FLOP/s and MFU against the measured GEMM
  rate (FLOPs of the layers actually run: 2 * linear params per layer *
  tokens * layers + causal attention 4 * nh * hd * n(n+1)/2 per sequence and
  layer), device memory;
- HF as users run it: batch 8 in input order, right-padded,
  model(..., output_hidden_states=True) (logits included), sdpa, bf16;
- HF at its best: length-sorted batches under a padded-token budget, the
  base model only (no logits), best of a few budgets;
- a sanity check that both compute the same pooled latents (bf16 vs bf16).
- weights kept quantized (not with --quick; alone with --quantized-only):
  a random Qwen3-shaped model (QUANT_SHAPE: hidden 2048, 4 layers, 16 heads,
  8 kv heads, intermediate 4096, vocab 32000: ~0.85 GB of fp32 to write and
  quantize with NumPy, so it stays short; --tiny: a tiny one, which runs
  on the emulated CUDA device too) written by rjepa_latent.testing as an AWQ
  directory (4 bits, groups of 128: testing/quantize.py) and a Q4_K_M-like
  GGUF (testing/gguf_blocks.py), each loaded kept and dequantized: load time,
  tokens/s on the GSM8K-like workload, device memory, and the pooled
  difference between the two (none expected: the same bf16 weights). It runs
  last, after the main results were written and printed, so a run stopped
  for time during it loses nothing else.
Load times are warm: the checkpoint was just written or read on this machine
(the page cache holds it unless memory ran short).
Prints a table last; full results as JSON to --json or $OUT/gpu_bench.json.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's in-place build

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=True, use_sliding_window=False)
TINY = dict(QWEN3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000)
# the quantized case (tiny_model's arguments: intermediate = 2 * hidden,
# head_dim = hidden / heads)
QUANT_SHAPE = dict(hidden=2048, layers=4, heads=16, kv_heads=8, vocab=32000)
QUANT_TINY = dict(hidden=256, layers=2, heads=2, kv_heads=1, vocab=320)
LAYER = -2
SHARD_BYTES = 4 << 30
DEV = "cuda"  # "cpu" only for a smoke test of this script (--smoke) without a GPU


# ---- checkpoint -----------------------------------------------------------------

def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (d,)),
                  (p + "self_attn.q_proj.weight", (nh * hd, d)),
                  (p + "self_attn.k_proj.weight", (nkv * hd, d)),
                  (p + "self_attn.v_proj.weight", (nkv * hd, d)),
                  (p + "self_attn.o_proj.weight", (d, nh * hd)),
                  (p + "self_attn.q_norm.weight", (hd,)),
                  (p + "self_attn.k_norm.weight", (hd,)),
                  (p + "post_attention_layernorm.weight", (d,)),
                  (p + "mlp.gate_proj.weight", (ff, d)),
                  (p + "mlp.up_proj.weight", (ff, d)),
                  (p + "mlp.down_proj.weight", (d, ff))]
    specs.append(("model.norm.weight", (d,)))
    return specs


CHECKPOINT_FORMAT = 1  # bump when write_checkpoint changes what it writes


def checkpoint_dir(shape: dict) -> Path:
    """The cache directory of a shape's checkpoint (not created)."""
    root = Path(os.environ.get("RJEPA_BENCH_CACHE") or
                Path(tempfile.gettempdir()) / "rjepa_bench_cache")
    key = json.dumps({"format": CHECKPOINT_FORMAT, "shape": shape}, sort_keys=True)
    return root / f"qwen3_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def checkpoint_complete(path: Path, shape: dict) -> bool:
    """True if `path` holds the complete checkpoint of `shape` written by
    this script (its meta.json, written last, and every shard at its size)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("shape") == shape and meta.get("format") == CHECKPOINT_FORMAT and
            all((path / f).is_file() and (path / f).stat().st_size == n
                for f, n in meta.get("files", {}).items()))


def ensure_checkpoint(torch, path: Path, shape: dict) -> float:
    """Writes the checkpoint of `shape` at `path` unless it is there complete;
    returns the seconds spent writing (0.0 when reused). Written under a
    temporary name first, so a killed run never leaves a checkpoint that
    looks complete."""
    if checkpoint_complete(path, shape):
        return 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    need = sum(2 * math.prod(s) for _, s in tensor_specs(shape))
    free = shutil.disk_usage(path.parent).free
    if free < need * 1.02:
        raise SystemExit(f"gpu_bench: {need / 1e9:.1f} GB needed for the checkpoint in "
                         f"{path.parent}, {free / 1e9:.1f} GB free (set RJEPA_BENCH_CACHE)")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    seconds = write_checkpoint(torch, tmp, shape)
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    (tmp / "meta.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "shape": shape,
                                               "files": files}))
    shutil.rmtree(path, ignore_errors=True)  # an incomplete one of an earlier run
    os.replace(tmp, path)
    return seconds


def write_checkpoint(torch, out: Path, shape: dict) -> float:
    """Sharded bf16 safetensors of random weights; returns seconds taken."""
    import transformers as T
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    T.Qwen3Config(**shape).save_pretrained(out)
    specs = tensor_specs(shape)
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    gen = torch.Generator(device=DEV).manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in shard:
            n = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for name, shape in shard:
                if name.endswith("norm.weight"):
                    t = 1.0 + 0.1 * torch.randn(shape, device=DEV, generator=gen)
                else:
                    t = 0.02 * torch.randn(shape, device=DEV, generator=gen)
                f.write(t.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    total = sum(2 * math.prod(s) for _, s in specs)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return time.perf_counter() - t0


# ---- workloads ---------------------------------------------------------------------

def make_workload(rng: np.random.Generator, n: int, mean: float, vocab: int) -> dict:
    """n sequences with lognormal lengths of about `mean` tokens; ~25% question,
    the rest split into 3..12 steps (mean-pooled spans)."""
    sigma = 0.45
    lens = rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, n).astype(int)
    lens = np.clip(lens, 24, int(mean * 5))
    seqs, spans = [], []
    for L in lens:
        seqs.append(rng.integers(0, vocab, L).astype(np.int32))
        q = max(1, L // 4)
        k = int(rng.integers(3, 13))
        cuts = np.unique(np.linspace(q, L, k + 1).astype(int))
        spans.append(np.stack([cuts[:-1], cuts[1:]], 1).astype(np.int32))
    return {"seqs": seqs, "spans": spans, "tokens": int(lens.sum()), "mean_len": float(lens.mean())}


def model_flops(cfg: dict, seqs: list[np.ndarray], n_layers: int) -> float:
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    linear = d * (nh + 2 * nkv) * hd + nh * hd * d + 3 * d * ff
    T = sum(len(s) for s in seqs)
    attn = sum(4 * nh * hd * len(s) * (len(s) + 1) / 2 for s in seqs)
    return float(n_layers * (2 * linear * T + attn))


# ---- measurements ------------------------------------------------------------------

def gemm_rate(torch, n: int = 8192, reps: int = 20) -> float:
    """Median bf16 matmul rate (FLOP/s) on random data, timed with events."""
    if DEV == "cpu":
        n, reps = 512, 3
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(torch)
        t0 = time.perf_counter()
        if DEV == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            a @ b
            times.append(time.perf_counter() - t0)
    del a, b
    empty_cache(torch)
    return 2 * n ** 3 / float(np.median(times))


def sync(torch) -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache(torch) -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def mem_info() -> tuple[int, int]:
    from rjepa_latent import _core
    return _core.cuda_mem_info(0) if DEV == "cuda" else (0, 0)


def bench_ours(torch, path: Path, loads: dict, shape: dict, attn: str) -> tuple[dict, dict]:
    """Load + extract every workload; attn picks the attention kernel
    (RJEPA_ATTN, read when the CUDA backend is created)."""
    import rjepa_latent as rl
    os.environ["RJEPA_ATTN"] = attn
    free0, total = mem_info()
    t0 = time.perf_counter()
    m = rl.Model(path, device="cuda:0" if DEV == "cuda" else "cpu",
                 max_layer=shape["num_hidden_layers"] - 1)
    load_s = time.perf_counter() - t0
    free1, _ = mem_info()
    out = {"load_s": load_s, "memory_report": m.memory_report(),
           "device_bytes_used": free0 - free1, "device_total_bytes": total}
    pooled = {}
    warm = loads["gsm8k_like"]
    m.extract(warm["seqs"][:16], warm["spans"][:16], [LAYER], "mean")  # warm-up
    for name, w in loads.items():
        t0 = time.perf_counter()
        res = m.extract(w["seqs"], w["spans"], [LAYER], "mean")
        dt = time.perf_counter() - t0
        flops = model_flops(shape, w["seqs"], shape["num_hidden_layers"] - 1)
        out[name] = {"seconds": dt, "tokens_per_s": w["tokens"] / dt, "tflops": flops / dt / 1e12}
        # copies: the result arrays keep their engine (and its device memory) alive
        pooled[name] = [a[0].copy() for a in res[:8]]
        del res
    out["device_bytes_after_run"] = free0 - mem_info()[0]
    m.close()
    del m
    gc.collect()
    return out, pooled


def bench_quantized(qshape: dict, n: int, device: str) -> dict:
    """Kept vs dequantized on a random Qwen3-shaped AWQ directory and a
    Q4_K_M-like GGUF (written to a temporary directory, removed after)."""
    import rjepa_latent as rl
    from rjepa_latent.testing import tiny_model
    from rjepa_latent.testing.quantize import quantize_hf
    root = Path(tempfile.mkdtemp(prefix="rjepa_bench_quant_"))
    out: dict = {"shape": qshape}
    try:
        t0 = time.perf_counter()
        src = tiny_model(root / "src", family="qwen3", seed=0, **qshape)
        models = {"awq": quantize_hf(src, root / "awq", "awq", group_size=128)}
        shutil.rmtree(src)
        models["gguf_q4_k_m"] = tiny_model(root / "m.gguf", family="qwen3", seed=0,
                                           format="gguf", dtype="Q4_K_M", **qshape)
        out["write_s"] = time.perf_counter() - t0
        w = make_workload(np.random.default_rng(1), n, 150, qshape["vocab"])
        out["tokens"] = w["tokens"]
        for name, path in models.items():
            pooled, res = {}, {}
            for weights in ("keep", "dequantize"):
                free0, _ = mem_info()
                t0 = time.perf_counter()
                m = rl.Model(path, device=device, weights=weights, max_layer=qshape["layers"] - 1)
                load_s = time.perf_counter() - t0
                used = free0 - mem_info()[0]
                m.extract(w["seqs"][:8], w["spans"][:8], [LAYER], "mean")   # warm-up
                t0 = time.perf_counter()
                r = m.extract(w["seqs"], w["spans"], [LAYER], "mean")
                dt = time.perf_counter() - t0
                pooled[weights] = [a[0].copy() for a in r[:8]]
                del r
                rep = m.memory_report()
                res[weights] = {"load_s": load_s, "tokens_per_s": w["tokens"] / dt,
                                "device_bytes_used": used, "weight_bytes": rep["weight_bytes"],
                                "workspace_bytes": rep["workspace_bytes"]}
                m.close()
                del m
                gc.collect()
            res["pooled_rel_err"] = rel_err(pooled["keep"], pooled["dequantize"])
            out[name] = res
            print(f"quantized {name}: " + json.dumps(res, default=str), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def quant_table(q: dict) -> list[str]:
    s = q["shape"]
    lines = [f"kept quantized (qwen3 hidden {s['hidden']}, {s['layers']} layers, vocab "
             f"{s['vocab']}; {q['tokens']} tokens):",
             f"{'model':<12} {'weights':<10} {'load s':>7} {'tok/s':>9} {'weights MiB':>11} "
             f"{'device MiB':>10} {'keep/deq err':>12}"]
    for name in ("awq", "gguf_q4_k_m"):
        for weights in ("keep", "dequantize"):
            r = q[name][weights]
            lines.append(f"{name:<12} {weights:<10} {r['load_s']:>7.1f} {r['tokens_per_s']:>9.0f} "
                         f"{r['weight_bytes'] / 2**20:>11.1f} {r['device_bytes_used'] / 2**20:>10.1f} "
                         f"{q[name]['pooled_rel_err'] if weights == 'keep' else float('nan'):>12.1e}")
    return lines


def _hf_batches(w: dict, order: list[int], budget: int | None, batch: int | None):
    cur: list[int] = []
    for i in order:
        n = len(w["seqs"][i])
        longest = max([len(w["seqs"][j]) for j in cur] + [n])
        if cur and ((batch and len(cur) == batch) or
                    (budget and longest * (len(cur) + 1) > budget)):
            yield cur
            cur = []
        cur.append(i)
    if cur:
        yield cur


def _hf_run(torch, model, w: dict, idx: list[int], full: bool) -> list[np.ndarray]:
    L = max(len(w["seqs"][i]) for i in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long)
    mask = torch.zeros(len(idx), L, dtype=torch.long)
    for r, i in enumerate(idx):
        s = w["seqs"][i]
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.inference_mode():
        net = model if full else model.model
        hs = net(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER]
        out = []
        for r, i in enumerate(idx):
            sp = torch.as_tensor(w["spans"][i])
            rows = [hs[r, a:b].float().mean(0) for a, b in sp.tolist()]
            out.append(torch.stack(rows).cpu().numpy())
    return out


def bench_hf(torch, path: Path, loads: dict, quick: bool) -> tuple[dict, dict]:
    import transformers as T
    t0 = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                   attn_implementation="sdpa",
                                                   device_map=DEV).eval()
    sync(torch)
    out = {"load_s": time.perf_counter() - t0}
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pooled = {}
    w0 = loads["gsm8k_like"]
    _hf_run(torch, model, w0, list(range(8)), True)  # warm-up
    for name, w in loads.items():
        n_user = min(len(w["seqs"]), 64 if quick else 128)
        order = list(range(n_user))
        sync(torch)
        t0 = time.perf_counter()
        res = {}
        for b in _hf_batches(w, order, None, 8):
            for i, r in zip(b, _hf_run(torch, model, w, b, True)):
                res[i] = r
        sync(torch)
        dt = time.perf_counter() - t0
        toks = sum(len(w["seqs"][i]) for i in order)
        user = {"texts": n_user, "seconds": dt, "tokens_per_s": toks / dt}
        pooled[name] = [res[i] for i in range(8)]
        best = {}
        n_best = min(len(w["seqs"]), 128 if quick else 256)
        order = sorted(range(n_best), key=lambda i: len(w["seqs"][i]))
        toks = sum(len(w["seqs"][i]) for i in order)
        for budget in ((8192,) if quick else (4096, 8192, 16384)):
            sync(torch)
            t0 = time.perf_counter()
            for b in _hf_batches(w, order, budget, None):
                _hf_run(torch, model, w, b, False)
            sync(torch)
            best[budget] = toks / (time.perf_counter() - t0)
        top = max(best, key=best.get)
        out[name] = {"user": user, "best": {"texts": n_best, "tokens_per_s": best[top],
                                            "padded_token_budget": top,
                                            "all_budgets": {str(k): v for k, v in best.items()}}}
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    del model
    gc.collect()
    empty_cache(torch)
    return out, pooled


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    num = sum(float(((x.astype(np.float64) - y) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((y.astype(np.float64) ** 2).sum()) for y in b)
    return math.sqrt(num / den)


# ---- report --------------------------------------------------------------------------

def table(r: dict) -> str:
    lines = [f"device: {r['device']}   cuBLAS bf16 GEMM 8192^3: {r['gemm_tflops']:.0f} TFLOP/s   "
             f"attention kernel: {r['attention_kernel']}",
             f"checkpoint: {r['checkpoint_gb']:.1f} GB "
             f"{'reused' if r['checkpoint_reused'] else 'written in %.1f s' % r['write_s']}; load: ours "
             f"{r['ours']['load_s']:.1f} s, HF {r.get('hf', {}).get('load_s', float('nan')):.1f} s",
             f"ours device memory: {r['ours']['device_bytes_used'] / 2**30:.1f} GiB "
             f"(weights {r['ours']['memory_report']['weight_bytes'] / 2**30:.1f} GiB); "
             f"HF peak {r.get('hf', {}).get('peak_bytes', 0) / 2**30:.1f} GiB",
             "",
             f"{'workload':<12} {'mean len':>8} {'ours tok/s':>11} {'TFLOP/s':>8} {'MFU':>6} "
             f"{'HF user':>9} {'HF best':>9} {'x user':>7} {'x best':>7} {'pooled err':>10}"]
    for name in ("gsm8k_like", "math_like"):
        o, w = r["ours"][name], r["workloads"][name]
        hf = r.get("hf", {}).get(name)
        u = hf["user"]["tokens_per_s"] if hf else float("nan")
        b = hf["best"]["tokens_per_s"] if hf else float("nan")
        lines.append(f"{name:<12} {w['mean_len']:>8.0f} {o['tokens_per_s']:>11.0f} "
                     f"{o['tflops']:>8.0f} {o['tflops'] / r['gemm_tflops']:>6.1%} {u:>9.0f} "
                     f"{b:>9.0f} {o['tokens_per_s'] / u:>7.2f} {o['tokens_per_s'] / b:>7.2f} "
                     f"{r.get('pooled_rel_err', {}).get(name, float('nan')):>10.2e}")
    if "ours_fma" in r:
        lines.append("attention on CUDA cores (RJEPA_ATTN=fma): " + ", ".join(
            f"{k} {r['ours_fma'][k]['tokens_per_s']:.0f} tok/s"
            for k in ("gsm8k_like", "math_like"))
            + f"; load {r['ours_fma']['load_s']:.1f} s")
    lines.append("goals: >= 2.5x HF best, MFU >= 60% of the measured GEMM rate, load < 15 s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer texts and HF settings")
    ap.add_argument("--n-texts", type=int, default=None, help="texts per workload (ours)")
    ap.add_argument("--model-dir", default=None,
                    help="where the checkpoint is (written there if missing); default: "
                         "the shape's directory in the cache")
    ap.add_argument("--json", default=None, help="where to write the full results")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model on the CPU: checks this script, measures nothing")
    ap.add_argument("--prepare", action="store_true",
                    help="only write (or find) the checkpoint, then exit: gpu_check.sh runs "
                         "this in the background while it builds and tests")
    ap.add_argument("--skip-quantized", action="store_true",
                    help="leave out the weights-kept-quantized case")
    ap.add_argument("--quantized-only", action="store_true",
                    help="only the weights-kept-quantized case (no torch needed: it runs on "
                         "the emulated CUDA device too)")
    ap.add_argument("--tiny", action="store_true",
                    help="with --quantized-only: a tiny model (a check of the code path)")
    args = ap.parse_args()
    global DEV
    if args.quantized_only:
        q = bench_quantized(QUANT_TINY if args.tiny else QUANT_SHAPE, args.n_texts or 128,
                            "cuda:0")
        dest = args.json or (os.path.join(os.environ["OUT"], "gpu_bench_quantized.json")
                             if os.environ.get("OUT") else None)
        if dest:
            Path(dest).write_text(json.dumps(q, indent=1, default=str))
        print("\n".join(quant_table(q)))
        return 0
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    shape = QWEN3_8B
    if args.smoke:
        DEV, shape = "cpu", TINY
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device (--smoke checks this script on the CPU)",
              file=sys.stderr)
        return 2
    path = Path(args.model_dir) if args.model_dir else checkpoint_dir(shape)
    if args.model_dir and (path / "config.json").exists() and not (path / "meta.json").exists():
        write_s = 0.0  # a checkpoint this script did not write: used as it is, never replaced
    elif args.prepare:
        write_s = ensure_checkpoint(torch, path, shape)
    else:
        write_s = None  # written (or found) below, once the GEMM rate is measured
    if args.prepare:
        print(f"checkpoint {path}: " + (f"written in {write_s:.1f} s" if write_s else "reused"))
        return 0
    rng = np.random.default_rng(0)
    n = args.n_texts or (128 if args.quick else 512)
    r: dict = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke)",
               "quick": args.quick, "n_texts": n, "shape": shape}
    r["gemm_tflops"] = gemm_rate(torch) / 1e12
    r["write_s"] = ensure_checkpoint(torch, path, shape) if write_s is None else write_s
    r["checkpoint_reused"] = r["write_s"] == 0.0
    r["checkpoint_dir"] = str(path)
    r["checkpoint_gb"] = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9
    loads = {"gsm8k_like": make_workload(rng, n, 150, shape["vocab_size"]),
             "math_like": make_workload(rng, n, 400, shape["vocab_size"])}
    r["workloads"] = {k: {"texts": len(w["seqs"]), "tokens": w["tokens"], "mean_len": w["mean_len"]}
                      for k, w in loads.items()}
    print(f"GEMM {r['gemm_tflops']:.0f} TFLOP/s; checkpoint {r['checkpoint_gb']:.1f} GB",
          flush=True)
    attn = os.environ.get("RJEPA_ATTN", "mma")  # gpu_check.sh may have chosen "fma"
    r["attention_kernel"] = attn
    r["ours"], ours_pooled = bench_ours(torch, path, loads, shape, attn)
    print(json.dumps(r["ours"], default=str), flush=True)
    if not args.quick and attn != "fma":  # the f32 CUDA-core attention kernel, for comparison
        r["ours_fma"], fma_pooled = bench_ours(torch, path, loads, shape, "fma")
        r["mma_vs_fma_rel_err"] = {k: rel_err(ours_pooled[k], fma_pooled[k]) for k in loads}
        print(json.dumps(r["ours_fma"], default=str), flush=True)
    if not args.skip_hf:
        r["hf"], hf_pooled = bench_hf(torch, path, loads, args.quick)
        r["pooled_rel_err"] = {k: rel_err(ours_pooled[k], hf_pooled[k]) for k in loads}
    dest = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json")
                         if os.environ.get("OUT") else None)
    if dest:
        Path(dest).write_text(json.dumps(r, indent=1, default=str))
    print(table(r), flush=True)
    if not args.quick and not args.skip_quantized:
        r["quantized"] = bench_quantized(QUANT_TINY if args.smoke else QUANT_SHAPE,
                                         min(n, 256), "cuda:0" if DEV == "cuda" else "cpu")
        if dest:
            Path(dest).write_text(json.dumps(r, indent=1, default=str))
        print("\n".join(quant_table(r["quantized"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

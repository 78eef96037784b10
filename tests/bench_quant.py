"""Weights kept quantized against dequantized at load, on the CPU: a random
Qwen3-shaped model written as a Q4_K_M-like GGUF file (Q4_K, with Q6_K for v
and down of every other layer and float32 norms), or as an AWQ / GPTQ / FP8
directory (--format; rjepa_latent.testing.quantize.random_quantized_hf,
streamed tensor by tensor: 4-bit groups of 128 or 128 x 128 FP8 blocks, a
float16 embedding), loaded in a fresh process per mode: load time, peak RSS
(VmHWM, against the checkpoint's size), and tokens/s of layer -2 step
extraction (mean over each step's tokens) over word problems
(rjepa_latent/samples, or --data, a GSM8K jsonl; made into texts as `extract`
makes them, tokenized with the default model's tokenizer, whose vocabulary
the GGUF file carries padded to Qwen3's: the weights are random, only the
shapes matter). With --llama-cpp (GGUF only), llama.cpp's prompt processing
(`llama-embedding`, mean pooling, see tests/peer_llama_cpp.py) of the same
texts on the same file: its prompt-eval tokens/s, load time and peak RSS (the
process's maximum resident set, from wait4). It runs every layer of the file;
our job stops after layer -2 (35 of 36 layers for 8B), so the table also
gives layer-tokens/s.

    python tests/bench_quant.py [--format gguf|awq|gptq|fp8] [--shape 8b|1.7b|0.6b]
                                [--layers N] [--texts 8] [--data GSM8K.jsonl]
                                [--threads 2] [--dir /tmp] [--modes keep,dequantize]
                                [--llama-cpp off|auto|PATH]

Shapes are Qwen3's (hidden, intermediate, heads, kv heads, head_dim 128,
vocab 151936, tied embeddings); --layers cuts the depth (the time per layer
and the memory per layer do not change). A mode that `rjepa_latent.memory_plan`
says does not fit in the memory available now is skipped with the plan's
numbers. The checkpoint is written into --dir and deleted afterwards. Not a
test: numbers depend on the machine.
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

import numpy as np

import peer_llama_cpp as llama_cpp

FORMATS = ("gguf", "awq", "gptq", "fp8")
SHAPES = {   # hidden, intermediate, layers, heads, kv heads
    "8b": (4096, 12288, 36, 32, 8),
    "1.7b": (2048, 6144, 28, 16, 8),
    "0.6b": (1024, 3072, 28, 16, 8),
}
VOCAB = 151936
AMPLITUDE = 0.05   # largest |weight| of a tensor, about


def mixed_type(kind: str, layer: int) -> str:
    return "Q6_K" if kind in ("v", "down") and layer % 2 == 0 else "Q4_K"


def random_tensor(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with one float16 scale for the whole tensor, chosen on a
    sample row so the largest value is about AMPLITUDE (fast for GBs)."""
    import gguf
    from rjepa_latent import _core
    from rjepa_latent.testing.gguf_blocks import SCALE_OFFSETS
    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block * nbytes), dtype=np.uint8)
    view = data.reshape(rows, -1, nbytes)
    one = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    for off in SCALE_OFFSETS[type_name]:
        view[:1, :, off:off + 2] = one
    peak = float(np.abs(_core.dequantize_gguf(data[:1], int(qtype), 1, cols)).max())
    scale = np.frombuffer(np.float16(AMPLITUDE / max(peak, 1e-30)).tobytes(), np.uint8)
    for off in SCALE_OFFSETS[type_name]:
        view[:, :, off:off + 2] = scale
    return data


def write_model(path: Path, shape: str, layers: int | None) -> dict:
    """Streams the file tensor by tensor (never the whole model in memory)."""
    import gguf
    from rjepa_latent.checkpoints import arch, checkpoint
    from rjepa_latent.testing.models import hf_config
    hidden, ff, n_layers, heads, kv = SHAPES[shape]
    n_layers = layers or n_layers
    raw = hf_config("qwen3", hidden=hidden, layers=n_layers, heads=heads, kv_heads=kv, vocab=VOCAB)
    raw.update(intermediate_size=ff, head_dim=128)
    public, _ = checkpoint.config_from_dict(raw, f"qwen3 {shape}")
    fam = arch.for_model_type("qwen3", str(path))
    from rjepa_latent.checkpoints.default_model import default_model_path
    w = gguf.GGUFWriter(str(path), fam.gguf_architecture)
    prefix = fam.gguf_architecture + "."
    llama_cpp.write_fields(w, llama_cpp.padded_vocab(default_model_path(), VOCAB))
    values = {**public, "value_dim": 128, "rope_dim": 128}
    for field, key in fam.GGUF_KEYS.items():
        value = values.get(field)
        if value is None or field.startswith("rope_scaling") or field == "vocab_size":
            continue
        if isinstance(value, float) or field in ("rms_norm_eps", "rope_theta"):
            w.add_float32(prefix + key, float(value))
        else:
            w.add_uint32(prefix + key, int(value))
    layout = [(k, l, s) for k, l, s in checkpoint.tensor_layout(public, n_layers)
              if k not in fam.COMPUTED]
    plan = []
    for kind, layer, shp in layout:
        if len(shp) == 1:
            plan.append((kind, layer, shp, None))
            w.add_tensor_info(fam.gguf_name(kind, layer), shp, np.dtype(np.float32), 4 * shp[0])
        else:
            t = mixed_type(kind, layer)
            qtype = gguf.GGMLQuantizationType[t]
            nbytes = shp[0] * shp[1] // gguf.GGML_QUANT_SIZES[qtype][0] * \
                gguf.GGML_QUANT_SIZES[qtype][1]
            plan.append((kind, layer, shp, t))
            w.add_tensor_info(fam.gguf_name(kind, layer), (shp[0], nbytes // shp[0]),
                              np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for kind, layer, shp, t in plan:
        arr = np.ones(shp, np.float32) if t is None else random_tensor(t, shp[0], shp[1], rng)
        w.write_tensor_data(arr)
    w.close()
    return public


def qwen3_config(shape: str, layers: int | None) -> dict:
    from rjepa_latent.testing.models import hf_config
    hidden, ff, n_layers, heads, kv = SHAPES[shape]
    raw = hf_config("qwen3", hidden=hidden, layers=layers or n_layers, heads=heads, kv_heads=kv,
                    vocab=VOCAB)
    raw.update(intermediate_size=ff, head_dim=128)
    return raw


def write_hf_model(path: Path, method: str, shape: str, layers: int | None) -> dict:
    """An AWQ / GPTQ / FP8 directory, one tensor in memory at a time."""
    from rjepa_latent.checkpoints import checkpoint
    from rjepa_latent.testing.quantize import random_quantized_hf
    raw = qwen3_config(shape, layers)
    random_quantized_hf(path, raw, method, group_size=128, amplitude=AMPLITUDE)
    return checkpoint.config_from_dict(raw, str(path))[0]


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import rjepa_latent as rl
path, weights, threads, texts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
t1 = time.perf_counter()
m = rl.Model(path, device="cpu", threads=threads, weights=weights, max_batch_tokens=2048)
load = time.perf_counter() - t1
load_hwm, load_rss, load_file = status("VmHWM"), status("VmRSS"), status("RssFile")
seqs, spans = json.load(open(texts))
n = sum(len(s) for s in seqs)
m.extract(seqs[:1], spans[:1], layers=[-2])     # warm-up (first-touch of the scratch)
t2 = time.perf_counter()
out = m.extract(seqs, spans, layers=[-2])
run = time.perf_counter() - t2
print(json.dumps({"weights": m.weights, "load_s": load, "import_rss": base,
                  "peak_rss": status("VmHWM"), "load_peak_rss": load_hwm, "load_rss": load_rss,
                  "load_rss_file": load_file, "weight_bytes": m.memory_report()["weight_bytes"],
                  "tokens": n, "extract_s": run, "tokens_per_s": n / run,
                  "finite": bool(all(np.isfinite(o).all() for o in out))}))
"""


def workload(path: Path, n_texts: int, data: str | None
             ) -> tuple[Path, list[str], list[list[int]]]:
    """Token ids and step spans of the sample word problems, or of a GSM8K
    jsonl, as JSON for the child processes, with the texts and ids for llama.cpp."""
    import rjepa_latent as rl
    from rjepa_latent.checkpoints.default_model import default_model_path
    from rjepa_latent.tools.bench import default_data
    m = rl.Model(default_model_path(), device="cpu", threads=1)
    texts, seqs, spans = llama_cpp.workload_texts(data or default_data(), m.tokenizer, n_texts, None)
    m.close()
    out = path.parent / "texts.json"
    out.write_text(json.dumps([seqs, [s.tolist() for s in spans]]))
    return out, texts, seqs


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=FORMATS, default="gguf")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--data", default=None, help="a GSM8K jsonl (default: the sample problems)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--modes", default="keep,dequantize")
    ap.add_argument("--llama-cpp", default="off", metavar="off|auto|PATH",
                    help="also run llama.cpp's prompt processing on the same GGUF file and texts "
                         "(auto: the cached build, else build one; see tests/peer_llama_cpp.py)")
    ap.add_argument("--ubatches", default="256,512", type=lambda s: [int(x) for x in s.split(",")],
                    help="llama.cpp ubatch sizes to try (best kept)")
    args = ap.parse_args()
    from rjepa_latent import memory_plan
    if args.llama_cpp != "off" and args.format != "gguf":
        ap.error("--llama-cpp runs GGUF files only: use --format gguf")
    try:
        llama = llama_cpp.find_or_build(args.llama_cpp)
    except ValueError as e:
        ap.error(str(e))
    tmp = Path(tempfile.mkdtemp(prefix="rjepa-bench-quant-", dir=args.dir))
    if args.format == "gguf":
        path = tmp / f"qwen3-{args.shape}-Q4_K_M.gguf"
    else:
        path = tmp / f"qwen3-{args.shape}-{args.format}"
    try:
        t = time.perf_counter()
        if args.format == "gguf":
            public = write_model(path, args.shape, args.layers)
            size = path.stat().st_size
        else:
            public = write_hf_model(path, args.format, args.shape, args.layers)
            size = sum(p.stat().st_size for p in path.iterdir())
        print(f"wrote {path.name}: {size / 2**30:.2f} GiB, {public['num_layers']} layers, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        texts, strings, ids = workload(path, args.texts, args.data)
        n_layers = public["num_layers"]
        print("| mode | load s | peak RSS GiB (after import) | peak RSS / file | weights GiB | "
              "tokens | tokens/s | layers run | layer-tokens/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        ours = None
        for mode in args.modes.split(","):
            plan = memory_plan(path, device="cpu", max_batch_tokens=2048, weights=mode,
                               device_memory=available_bytes())
            if not plan["fits"]:
                print(f"| {mode} | refused by memory_plan: weights {plan['weight_bytes'] / 2**30:.1f}"
                      f" GiB + workspace {plan['workspace_bytes'] / 2**30:.1f} GiB do not fit the "
                      f"{plan['device_memory'] / 2**30:.1f} GiB available | | | | | |", flush=True)
                continue
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(args.threads),
                                str(texts)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"| {mode} | failed: {r.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            s = json.loads(r.stdout.strip().splitlines()[-1])
            ours = ours or s
            print(f"| {s['weights']} | {s['load_s']:.1f} | {s['peak_rss'] / 2**30:.2f} "
                  f"({(s['peak_rss'] - s['import_rss']) / 2**30:.2f}) | "
                  f"{s['peak_rss'] / size:.2f} | {s['weight_bytes'] / 2**30:.2f} | {s['tokens']} | "
                  f"{s['tokens_per_s']:.1f} | {n_layers - 1} | "
                  f"{s['tokens_per_s'] * (n_layers - 1):.0f} |", flush=True)
            print(f"<!-- {mode}: after load RSS {s['load_rss'] / 2**30:.2f} GiB (file-backed "
                  f"{s['load_rss_file'] / 2**30:.2f}), peak during load "
                  f"{s['load_peak_rss'] / 2**30:.2f} GiB -->", flush=True)
        if llama is not None:
            best, runs = llama.best_embed(path, strings, threads=args.threads,
                                          ubatches=args.ubatches)
            print(f"| llama.cpp {llama.version}, ubatch {best.ubatch} | {best.load_s:.1f} | "
                  f"{best.peak_rss / 2**30:.2f} | {best.peak_rss / size:.2f} | | {best.tokens} | "
                  f"{best.tokens_per_s:.1f} | {n_layers} | {best.tokens_per_s * n_layers:.0f} |")
            print("\nllama.cpp: " + llama_cpp.check_tokens(best, ids) + "; tokens/s of its runs: "
                  + ", ".join(f"ubatch {r.ubatch} {r.tokens_per_s:.1f}" for r in runs))
            if ours:
                print(f"ours ({ours['weights']}) / llama.cpp: "
                      f"{ours['tokens_per_s'] / best.tokens_per_s:.2f}x in tokens/s, "
                      f"{ours['tokens_per_s'] * (n_layers - 1) / (best.tokens_per_s * n_layers):.2f}x"
                      f" in layer-tokens/s; peak RSS {ours['peak_rss'] / best.peak_rss:.2f}x")
            print(f"load average: {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

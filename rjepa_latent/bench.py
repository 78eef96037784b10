"""`rjepa-latent bench`: this engine vs HF transformers on the CPU, same run.

Workload: a SmolLM2-135M-shaped Llama (576 hidden, 30 layers, 9 heads, 3 KV
heads, intermediate 1536, vocab 49152, tied embeddings, rope_theta 1e5) with
random weights, created with transformers in a temporary directory (nothing
is downloaded). Sequences have GSM8K-like lengths: taken from GSM8K records
(question + answer, ~4 characters per token, each answer line one step) when
a GSM8K jsonl is found, else drawn from a fixed seeded distribution (mean
~150 tokens, 40..400). Token ids are random. Output: layer -2 mean-pooled per
step, the design's default job.

This engine: `Model.extract` with packed batches under --max-batch-tokens.
HF: the base model (no LM head, which would only slow HF down), fp32,
`output_hidden_states=True`, batches of --hf-batch right-padded sequences
with an attention mask, under `torch.inference_mode`, pooling done in torch;
measured both in input order and sorted by length (less padding). Warm-up
runs are excluded; both use --threads threads; each runner's best of
--repeats interleaved rounds is kept. Tokens/s counts real tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
            rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=1024)
DEFAULT_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def _positive(s: str) -> int:
    """argparse type: an int >= 1 (0 rounds or sequences would leave nothing to time)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive, default=2, help="CPU threads for both (default 2)")
    p.add_argument("--n-seqs", type=_positive, default=64, help="sequences to run (default 64)")
    p.add_argument("--max-batch-tokens", type=_positive, default=2048,
                   help="token budget of this engine's packed batches (default 2048)")
    p.add_argument("--hf-batch", type=_positive, default=8, help="HF batch size (default 8)")
    p.add_argument("--gsm8k", default=str(DEFAULT_GSM8K),
                   help="GSM8K jsonl for realistic lengths (synthetic lengths if missing)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test, no timing)")
    p.add_argument("--repeats", type=_positive, default=2,
                   help="interleaved timed rounds, best of each runner kept (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")


# -- workload ------------------------------------------------------------------

def gsm8k_workload(path: str, n: int) -> list[list[int]]:
    """Step token lengths [question, step1, ...] from GSM8K records (chars/4)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            rec = json.loads(line)
            steps = [s for s in rec["answer"].split("\n") if s.strip()]
            out.append([max(1, round(len(rec["question"]) / 4))] +
                       [max(1, round(len(s) / 4)) for s in steps])
    return out


def synthetic_workload(n: int, seed: int) -> list[list[int]]:
    """Seeded lengths with mean ~150 (40..400): a question then 2-8 steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        total = int(np.clip(rng.lognormal(np.log(135), 0.45), 40, 400))
        k = int(rng.integers(2, 9))
        cuts = np.sort(rng.choice(np.arange(1, total), size=k, replace=False))
        out.append(np.diff(np.concatenate([[0], cuts, [total]])).tolist())
    return out


def make_inputs(step_lengths: list[list[int]], vocab: int,
                seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random token ids and step spans (the first segment is the question: no span)."""
    rng = np.random.default_rng(seed + 1)
    seqs, spans = [], []
    for lengths in step_lengths:
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        seqs.append(rng.integers(0, vocab, int(bounds[-1])).astype(np.int32))
        spans.append(np.stack([bounds[1:-1], bounds[2:]], 1).astype(np.int32))
    return seqs, spans


# -- the two runners ---------------------------------------------------------------

def build_checkpoint(shape: dict, directory: str, seed: int):
    import torch
    import transformers as T
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(T.LlamaConfig(**shape)).eval()
    model.save_pretrained(directory)
    return model.model  # the base model for HF runs: no LM head


def run_engine(m, seqs, spans) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = m.extract(seqs, spans, layers=(-2,), pooling="mean")
    return time.perf_counter() - t0, out


def hf_batches(n: int, lengths: list[int], size: int, sort: bool) -> list[list[int]]:
    order = sorted(range(n), key=lambda i: lengths[i]) if sort else list(range(n))
    return [order[i:i + size] for i in range(0, n, size)]


def run_hf(model, seqs, spans, args, sort: bool) -> tuple[float, list[np.ndarray]]:
    import torch
    lengths = [len(s) for s in seqs]
    batches = hf_batches(len(seqs), lengths, args.hf_batch, sort)

    def one(batch: list[int]) -> list[np.ndarray]:
        t = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), t), dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :lengths[i]] = torch.from_numpy(seqs[i].astype(np.int64))
            mask[r, :lengths[i]] = 1
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = states.hidden_states[-2]
        return [torch.stack([h[r, s:e].mean(0) for s, e in spans[i].tolist()])[None].numpy()
                for r, i in enumerate(batch)]

    out: list = [None] * len(seqs)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for batch in batches:
            for i, res in zip(batch, one(batch)):
                out[i] = res
        return time.perf_counter() - t0, out


# -- report --------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def worst_rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


def run(args: argparse.Namespace) -> int:
    import torch
    torch.set_num_threads(args.threads)
    shape = TINY if args.tiny else SMOLLM2_135M
    n = 8 if args.tiny else args.n_seqs
    use_gsm8k = os.path.isfile(args.gsm8k)
    steps = gsm8k_workload(args.gsm8k, n) if use_gsm8k else synthetic_workload(n, args.seed)
    seqs, spans = make_inputs(steps, shape["vocab_size"], args.seed)
    tokens = sum(len(s) for s in seqs)
    from ._native import build_info
    from .model import Model
    with tempfile.TemporaryDirectory(prefix="rjepa-bench-") as d:
        hf_model = build_checkpoint(shape, d, args.seed)
        engine = Model(d, device="cpu", threads=args.threads,
                       max_batch_tokens=args.max_batch_tokens)
    # warm-up (excluded), then the best of --repeats interleaved rounds, so a
    # burst of load from other processes does not favour either side
    run_engine(engine, seqs[:4], spans[:4])
    run_hf(hf_model, seqs[:2], spans[:2], args, sort=False)
    t_eng = t_hf = t_hfs = float("inf")
    for _ in range(args.repeats):
        t, ours = run_engine(engine, seqs, spans)
        t_eng = min(t_eng, t)
        t, ref = run_hf(hf_model, seqs, spans, args, sort=False)
        t_hf = min(t_hf, t)
        t_hfs = min(t_hfs, run_hf(hf_model, seqs, spans, args, sort=True)[0])
    res = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
        "blas": build_info()["blas"],
        "model": "tiny llama" if args.tiny else "SmolLM2-135M-shaped llama (random weights)",
        "workload": f"{n} sequences, {tokens} tokens (mean {tokens / n:.0f}), "
                    f"{sum(len(s) for s in spans)} steps, lengths from "
                    f"{'GSM8K test (chars/4)' if use_gsm8k else 'a seeded distribution'}, "
                    f"layer -2 mean-pooled per step",
        "engine_tokens_per_s": tokens / t_eng, "hf_tokens_per_s": tokens / t_hf,
        "hf_sorted_tokens_per_s": tokens / t_hfs,
        "speedup_vs_hf": t_hf / t_eng, "speedup_vs_hf_sorted": t_hfs / t_eng,
        "max_rel_err_vs_hf": worst_rel_err(ours, ref),
        "max_batch_tokens": args.max_batch_tokens, "hf_batch": args.hf_batch,
        "repeats": args.repeats, "load_average": os.getloadavg()[0],
    }
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def format_table(r: dict) -> str:
    rows = [("rjepa_latent (packed, fp32)", r["engine_tokens_per_s"], 1.0),
            (f"HF transformers fp32, batch {r['hf_batch']}, input order", r["hf_tokens_per_s"],
             r["speedup_vs_hf"]),
            (f"HF transformers fp32, batch {r['hf_batch']}, length-sorted",
             r["hf_sorted_tokens_per_s"], r["speedup_vs_hf_sorted"])]
    lines = [f"machine: {r['machine']}; threads: {r['threads']}; load average at the end: "
             f"{r['load_average']:.1f}", f"BLAS: {r['blas']}", f"model: {r['model']}",
             f"workload: {r['workload']}", "",
             f"| {'runner':50s} | {'tokens/s':>9s} | {'engine speedup':>14s} |",
             f"|{'-' * 52}|{'-' * 11}|{'-' * 16}|"]
    lines += [f"| {name:50s} | {tps:9.0f} | {rel:13.2f}x |" for name, tps, rel in rows]
    lines += ["", f"speedup vs HF: {r['speedup_vs_hf']:.2f}x (input order), "
                  f"{r['speedup_vs_hf_sorted']:.2f}x (length-sorted); "
                  f"max relative error of the latents vs HF: {r['max_rel_err_vs_hf']:.1e}"]
    return "\n".join(lines)

"""`rjepa-latent bench`: this engine's throughput on the CPU, and HF
transformers' on the same texts in the same run when torch is installed.

Workload: the records of `--data` (default: the sample word problems shipped
with the package, `rjepa_latent/samples/word_problems.jsonl`; any file
`extract` takes), made into texts and step spans exactly as `extract` does
(`data.Template`, `tokenize.tokenize_records`) with the model's tokenizer;
`--n-seqs` of them, cycling through the records when there are fewer. A
model without a tokenizer (`--tiny`, a bare GGUF) gets random token ids with
~4 characters per token and one span per step. The job is layer `--layer`
(default -2) mean-pooled per step, the design's default job.

This engine: `Model.extract` over packed batches under --max-batch-tokens.
HF (only when torch and transformers import; otherwise the engine's numbers
alone and the command that installs them): the same checkpoint loaded as
`rjepa-latent parity` loads it (transformers' own reader, fp32), the base
model (no LM head, which would only slow HF down), `output_hidden_states=True`,
batches of --hf-batch right-padded sequences with an attention mask, under
`torch.inference_mode`, pooling in torch; in input order and sorted by length
(less padding). Warm-up runs are excluded; both use --threads threads; each
runner's best of --repeats interleaved rounds is kept, so ratios compare
numbers of the same run. Tokens/s counts real (unpadded) tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
            rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=1024)
HF_INSTALL_HINT = 'pip install torch "transformers>=4.56"'


def default_data() -> str:
    """The sample word problems shipped with the package."""
    return str(files("rjepa_latent") / "samples" / "word_problems.jsonl")


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
    p.add_argument("--model", help="HF checkpoint directory or .gguf file (default: the default model)")
    p.add_argument("--data", default=None,
                   help="records to time, any file `extract` takes (default: the sample word "
                        "problems shipped with the package)")
    p.add_argument("--threads", type=_positive, default=os.cpu_count() or 1,
                   help=f"CPU threads for both (default: all cores, {os.cpu_count()})")
    p.add_argument("--n-seqs", type=_positive, default=64,
                   help="sequences to run, cycling through the records (default 64)")
    p.add_argument("--layer", type=int, default=-2, help="hidden-state index to pool (default -2)")
    p.add_argument("--max-batch-tokens", type=_positive, default=2048,
                   help="token budget of this engine's packed batches (default 2048)")
    p.add_argument("--hf-batch", type=_positive, default=8, help="HF batch size (default 8)")
    p.add_argument("--repeats", type=_positive, default=2,
                   help="interleaved timed rounds, best of each runner kept (default 2)")
    p.add_argument("--no-hf", action="store_true", help="time this engine only")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random llama made with transformers (smoke test, no timing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


# -- workload ------------------------------------------------------------------

def load_workload(data: str, tokenizer, n: int, max_tokens: int | None, vocab: int,
                  seed: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(token ids, step spans, records used) of `n` sequences from `data`."""
    from ..inputs.data import ErrorRecord, read_records
    from ..inputs.tokenize import Item, prepare_tokenizer, tokenize_records
    records = [r for r in read_records([data]) if not isinstance(r, ErrorRecord)]
    if not records:
        raise ValueError(f"{data}: no usable record (see `rjepa-latent extract` for the formats)")
    if tokenizer is not None:
        items = [t for t in tokenize_records(prepare_tokenizer(tokenizer), records, max_tokens)
                 if isinstance(t, Item)]
        if not items:
            raise ValueError(f"{data}: no record could be tokenized into steps by this model's "
                             "tokenizer (too long, or steps without a token of their own)")
        pairs = [(it.ids, it.spans) for it in items]
    else:  # no tokenizer: random ids, ~4 characters per token, one span per step
        rng = np.random.default_rng(seed + 1)
        pairs = []
        for r in records:
            spans, end = [], 0
            for a, b in r.steps:
                start = max(a // 4, end)
                end = max(start + 1, -(-b // 4))
                spans.append((start, end))
            length = max(end, -(-len(r.text) // 4))
            pairs.append((rng.integers(0, vocab, length).astype(np.int32),
                          np.array(spans, dtype=np.int32)))
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    return [c[0] for c in chosen], [c[1] for c in chosen], len(pairs)


# -- the two runners ---------------------------------------------------------------

def run_engine(m, seqs, spans, layer: int) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = m.extract(seqs, spans, layers=(layer,), pooling="mean")
    return time.perf_counter() - t0, out


def hf_batches(n: int, lengths: list[int], size: int, sort: bool) -> list[list[int]]:
    order = sorted(range(n), key=lambda i: lengths[i]) if sort else list(range(n))
    return [order[i:i + size] for i in range(0, n, size)]


def run_hf(torch, model, seqs, spans, batch_size: int, layer: int,
           sort: bool) -> tuple[float, list[np.ndarray]]:
    lengths = [len(s) for s in seqs]
    batches = hf_batches(len(seqs), lengths, batch_size, sort)

    def one(batch: list[int]) -> list[np.ndarray]:
        t = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), t), dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :lengths[i]] = torch.from_numpy(seqs[i].astype(np.int64))
            mask[r, :lengths[i]] = 1
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = states.hidden_states[layer]
        return [torch.stack([h[r, s:e].mean(0) for s, e in spans[i].tolist()])[None].numpy()
                for r, i in enumerate(batch)]

    out: list = [None] * len(seqs)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for batch in batches:
            for i, res in zip(batch, one(batch)):
                out[i] = res
        return time.perf_counter() - t0, out


def _import_hf():
    """torch, or None when torch or transformers cannot be imported."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return None
    return torch


def build_tiny(directory: str, seed: int) -> None:
    import torch
    import transformers as T
    torch.manual_seed(seed)
    T.LlamaForCausalLM(T.LlamaConfig(**TINY)).eval().save_pretrained(directory)


def load_hf(torch, path: str):
    """The checkpoint as `rjepa-latent parity` loads it (fp32, CPU); its base model."""
    from .parity import _reference
    notes: list[str] = []
    model = _reference(path, torch, torch.float32, "cpu", None, notes)
    try:  # parity loads eager attention; users run HF's default, sdpa
        model.set_attn_implementation("sdpa")
    except Exception as e:  # older transformers, or a model without sdpa
        notes.append(f"HF attention left at {model.config._attn_implementation!r} ({e})")
    notes.append(f"HF attention: {model.config._attn_implementation}")
    return model.model, notes


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
    return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)) for x, y in zip(a, b))


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"bench [{time.perf_counter() - self.t0:5.1f} s] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # ModelFormatError is a ValueError
        print(f"rjepa-latent bench: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    say = _Progress(args.no_progress)
    torch = None if args.no_hf else _import_hf()
    if args.tiny and torch is None:
        raise ImportError(f"--tiny makes its model with transformers, which cannot be imported "
                          f"({HF_INSTALL_HINT}); give --model instead")
    data = args.data or default_data()
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data}: no such file")
    from .._native import build_info
    from ..engine.model import Model
    if torch is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rjepa-bench-") as d:
        if args.tiny:
            build_tiny(d, args.seed)
            path, model_name = d, "tiny random llama (smoke test)"
        elif args.model:
            path, model_name = args.model, args.model
        else:
            from ..checkpoints.default_model import DEFAULT_MODEL_NAME, default_model_path
            path, model_name = default_model_path(), DEFAULT_MODEL_NAME
        say(f"loading {model_name} into this engine ({args.threads} threads)")
        engine = Model(path, device="cpu", threads=args.threads, max_batch_tokens=args.max_batch_tokens)
        layer = engine.resolve_layers([args.layer])[0]
        kernel = engine.kernel
        seqs, spans, used = load_workload(data, engine.tokenizer, args.n_seqs,
                                          engine.config.get("max_position_embeddings"),
                                          engine.config["vocab_size"], args.seed)
        tokens = int(sum(len(s) for s in seqs))
        say(f"workload: {len(seqs)} sequences, {tokens} tokens from {Path(data).name}")
        hf_model, notes = None, []
        if torch is not None:
            say("loading the same checkpoint into HF transformers (fp32)")
            hf_model, notes = load_hf(torch, path)
    # warm-up (excluded), then the best of --repeats interleaved rounds, so a
    # burst of load from other processes does not favour either side
    say("warm-up")
    run_engine(engine, seqs[:4], spans[:4], layer)
    if hf_model is not None:
        run_hf(torch, hf_model, seqs[:2], spans[:2], args.hf_batch, layer, sort=False)
    t_eng = t_hf = t_hfs = float("inf")
    ours = ref = None
    for k in range(args.repeats):
        t, ours = run_engine(engine, seqs, spans, layer)
        t_eng = min(t_eng, t)
        say(f"round {k + 1}/{args.repeats}: rjepa_latent {tokens / t:,.0f} tokens/s")
        if hf_model is not None:
            t, ref = run_hf(torch, hf_model, seqs, spans, args.hf_batch, layer, sort=False)
            t_hf = min(t_hf, t)
            t2 = run_hf(torch, hf_model, seqs, spans, args.hf_batch, layer, sort=True)[0]
            t_hfs = min(t_hfs, t2)
            say(f"round {k + 1}/{args.repeats}: HF {tokens / t:,.0f} tokens/s (input order), "
                f"{tokens / t2:,.0f} (length-sorted)")
    engine.close()
    res = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
        "blas": build_info()["blas"], "model": model_name, "kernel": kernel,
        "cpu_isa": build_info()["cpu_isa"] if "openblas" not in kernel.lower() else "openblas",
        "cpu_isas": build_info()["cpu_isas"],
        "workload": f"{len(seqs)} sequences from {used} records of {Path(data).name}, {tokens} tokens "
                    f"(mean {tokens / len(seqs):.0f}), {sum(len(s) for s in spans)} steps, "
                    f"layer {args.layer} mean-pooled per step",
        "sequences": len(seqs), "tokens": tokens,
        "engine_tokens_per_s": tokens / max(t_eng, 1e-9),
        "max_batch_tokens": args.max_batch_tokens, "hf_batch": args.hf_batch,
        "repeats": args.repeats, "load_average": os.getloadavg()[0],
    }
    if hf_model is not None:
        res.update({"hf_tokens_per_s": tokens / max(t_hf, 1e-9),
                    "hf_sorted_tokens_per_s": tokens / max(t_hfs, 1e-9),
                    "speedup_vs_hf": t_hf / t_eng, "speedup_vs_hf_sorted": t_hfs / t_eng,
                    "max_rel_err_vs_hf": worst_rel_err(ours, ref), "hf_notes": notes})
    else:
        res["hf_skipped"] = ("--no-hf" if args.no_hf else
                             f"torch or transformers cannot be imported; {HF_INSTALL_HINT} to "
                             "compare with HF transformers in the same run")
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def format_table(r: dict) -> str:
    rows = [("rjepa_latent (packed, fp32)", r["engine_tokens_per_s"], 1.0)]
    if "hf_tokens_per_s" in r:
        rows += [(f"HF transformers fp32, batch {r['hf_batch']}, input order", r["hf_tokens_per_s"],
                  r["speedup_vs_hf"]),
                 (f"HF transformers fp32, batch {r['hf_batch']}, length-sorted",
                  r["hf_sorted_tokens_per_s"], r["speedup_vs_hf_sorted"])]
    lines = [f"machine: {r['machine']}; threads: {r['threads']}; load average at the end: "
             f"{r['load_average']:.1f}", f"BLAS: {r['blas']}",
             f"GEMM: {r['kernel']}; ISA: {r['cpu_isa']} (this CPU runs: {r['cpu_isas']}; "
             "RJEPA_CPU_ISA or RJEPA_GEMM=openblas choose)", f"model: {r['model']}",
             f"workload: {r['workload']}", "",
             f"| {'runner':50s} | {'tokens/s':>9s} | {'engine speedup':>14s} |",
             f"|{'-' * 52}|{'-' * 11}|{'-' * 16}|"]
    lines += [f"| {name:50s} | {tps:9.0f} | {rel:13.2f}x |" for name, tps, rel in rows]
    if "hf_tokens_per_s" in r:
        lines += ["", f"speedup vs HF: {r['speedup_vs_hf']:.2f}x (input order), "
                      f"{r['speedup_vs_hf_sorted']:.2f}x (length-sorted), measured in this run; "
                      f"max relative error of the latents vs HF: {r['max_rel_err_vs_hf']:.1e}"]
        lines += [f"note: {n}" for n in r.get("hf_notes", [])]
    else:
        lines += ["", f"HF transformers not run: {r['hf_skipped']}"]
    return "\n".join(lines)

"""Per-token activation extraction + write throughput: this engine against HF
transformers with forward hooks writing the same rows.

    python tests/bench_sites.py [--hidden 576] [--layers 30] [--heads 9] [--kv-heads 3]
                                [--texts 64] [--length 256] [--sites blocks.15.hook_resid_post]
                                [--threads N] [--repeats 2] [--no-pipeline]

Builds (once, cached under $TMPDIR/rjepa-bench-sites-*) a random Llama model
of the given shape (`rjepa_latent.testing.tiny_model`; the default is
SmolLM2-135M's shape with an MLP of 2 x hidden) and `--texts` sequences of
random token ids of about `--length` tokens, then times, in the same
process, every token's activations at `--sites` written as flat
[tokens, width] float32 rows to a memory-mapped .npy per site:

- ours: `Model.extract(seqs, pooling="none", sites=...)` (packed batches, the
  forward stops at the deepest site), rows copied into the files;
- HF hooks: `AutoModelForCausalLM` (fp32, sdpa attention), one sequence per
  forward (no padding), forward hooks on the sites' modules copying the rows
  into the files, and the forward stopped by an exception right after the
  deepest hooked module (the way SAE pipelines cache activations today,
  at their best);
- ours, pipeline (unless --no-pipeline): `extract_dataset(..., pooling="none",
  sites=...)` over a JSONL of the same texts (tokenize, compute, convert, write
  and fsync shards), tokens/s from its summary;
- SAELens (with --saelens, when `sae_lens` is installed): its
  `CacheActivationsRunner` over the HF model (`AutoModelForCausalLM`, hooks on
  the HF module) caching the first site, which must be a `hook_resid_post`,
  into its HF-datasets cache; it takes fixed windows, so it gets `--texts`
  (rounded up to its batch of 8) windows of `--length` tokens of the same
  kind, one buffer for all of them.

Rows are checked to agree (ours vs HF, max error / max |HF| per site within
1e-3: a random model's float32 drift grows with depth, to ~2e-5 in the hidden
states at block 4 of the default shape already, and attention can amplify it). Prints tokens/s
and GB/s of rows written per method (best of --repeats) and the ratios to HF.
Not a test: numbers depend on the machine; run it on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Stop(Exception):
    """Raised by the last hook: the rest of the HF forward is not needed."""


def build(root: Path, args) -> Path:
    from rjepa_latent.testing import tiny_model
    path = root / f"llama-{args.hidden}-{args.layers}-{args.heads}-{args.kv_heads}"
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        tiny_model(path, family="llama", hidden=args.hidden, layers=args.layers, heads=args.heads,
                   kv_heads=args.kv_heads)
    return path


def sequences(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 300, int(rng.integers(length // 2, 3 * length // 2 + 1))).astype(np.int32)
            for _ in range(n)]


def open_rows(out: Path, widths: dict[str, int], total: int) -> dict[str, np.ndarray]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return {s: np.lib.format.open_memmap(out / f"{s}.npy", mode="w+", dtype=np.float32,
                                         shape=(total, w)) for s, w in widths.items()}


def close_rows(rows: dict[str, np.ndarray]) -> None:
    for a in rows.values():
        a.flush()
    rows.clear()


def run_ours(m, seqs, sites, rows, chunk: int = 16) -> None:
    at = 0
    for i in range(0, len(seqs), chunk):
        part = seqs[i:i + chunk]
        for res, ids in zip(m.extract(part, pooling="none", sites=sites), part):
            for s, arr in res.items():
                rows[s][at:at + ids.size] = arr
            at += ids.size


def hf_modules(hf, site):
    """(module, pre-hook?) HF exposes a site at (Llama: pre-norms only)."""
    layer = hf.model.layers[site.block]
    return {"resid_pre": (layer, True), "resid_post": (layer, False),
            "attn_z": (layer.self_attn.o_proj, True), "attn_out": (layer.self_attn.o_proj, False),
            "mlp_post": (layer.mlp.down_proj, True), "mlp_out": (layer.mlp.down_proj, False),
            "resid_mid": (None, None)}[site.kind]


def run_hf(hf, torch, seqs, sites, rows) -> None:
    pos = {"at": 0, "n": 0}
    handles = []
    order = {s.name: i for i, s in enumerate(sites)}
    # the hook that fires last in the forward stops it
    depth = {s.name: (s.block, ["resid_pre", "attn_z", "attn_out", "mlp_post", "mlp_out",
                                "resid_post"].index(s.kind)) for s in sites}
    last = max(sites, key=lambda s: depth[s.name]).name

    def hook_for(name, pre):
        def hook(mod, args, out=None):
            t = args[0] if pre else (out[0] if isinstance(out, tuple) else out)
            rows[name][pos["at"]:pos["at"] + pos["n"]] = t[0].detach().numpy()
            if name == last:
                raise _Stop
        return hook

    for s in sites:
        mod, pre = hf_modules(hf, s)
        if mod is None:
            raise SystemExit(f"{s.name}: HF has no module for resid_mid; bench another site")
        h = mod.register_forward_pre_hook(hook_for(s.name, True)) if pre else \
            mod.register_forward_hook(hook_for(s.name, False))
        handles.append(h)
    del order
    try:
        with torch.inference_mode():
            for ids in seqs:
                pos["n"] = ids.size
                try:
                    hf(torch.from_numpy(ids.astype(np.int64))[None], use_cache=False)
                except _Stop:
                    pass
                pos["at"] += ids.size
    finally:
        for h in handles:
            h.remove()


def run_pipeline(m, seqs, sites, root: Path) -> tuple[float, int, int]:
    import rjepa_latent as rl
    data = root / "texts.jsonl"
    tok = m.tokenizer
    with open(data, "w", encoding="utf-8") as f:
        for i, ids in enumerate(seqs):
            f.write(json.dumps({"id": f"t{i}", "text": tok.decode(ids.tolist())}) + "\n")
    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = rl.extract_dataset(data, m, out, sites=sites, pooling="none", progress=False,
                           shard_size=max(1, len(seqs) // 4))
    dt = time.perf_counter() - t
    nbytes = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    return dt, int(s["tokens"]), nbytes


def run_saelens(path: Path, site, width: int, n: int, length: int, root: Path
                ) -> tuple[float, int, int]:
    import torch
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    if site.kind != "resid_post":
        raise SystemExit("--saelens caches the first site, which must be a hook_resid_post")
    batch = 8
    n = -(-n // batch) * batch
    rng = np.random.default_rng(1)
    ds = Dataset.from_dict({"input_ids": [rng.integers(2, 300, length).tolist() for _ in range(n)]})
    out = root / "saelens"
    shutil.rmtree(out, ignore_errors=True)
    tokens = n * length
    cfg = CacheActivationsRunnerConfig(
        dataset_path="", model_name=str(path), model_class_name="AutoModelForCausalLM",
        model_batch_size=batch, hook_name=f"model.layers.{site.block}", d_in=width,
        training_tokens=tokens, context_size=length, new_cached_activations_path=str(out),
        shuffle=False, dtype="float32", device="cpu", prepend_bos=False,
        buffer_size_gb=tokens * width * 4 / 1e9, model_from_pretrained_kwargs={"dtype": torch.float32})
    runner = CacheActivationsRunner(cfg, override_dataset=ds)
    t = time.perf_counter()
    runner.run()
    return time.perf_counter() - t, tokens, tokens * width * 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--sites", default=None, help="comma-separated (default: the middle block's "
                                                  "hook_resid_post)")
    ap.add_argument("--threads", type=int, default=None, help="engine and torch threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--saelens", action="store_true", help="also time SAELens's CacheActivationsRunner")
    args = ap.parse_args(argv)

    import torch
    import transformers as T
    import rjepa_latent as rl
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    root = Path(tempfile.gettempdir()) / f"rjepa-bench-sites-{os.getuid()}"
    root.mkdir(exist_ok=True)
    path = build(root, args)
    names = args.sites.split(",") if args.sites else [f"blocks.{args.layers // 2}.hook_resid_post"]
    seqs = sequences(args.texts, args.length)
    total = int(sum(s.size for s in seqs))
    m = rl.Model(path, device="cpu", threads=threads)
    sites = m.resolve_sites(names)
    widths = {s.name: s.width(m.config) for s in sites}
    nbytes = total * sum(widths.values()) * 4
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", lambda r: run_ours(m, seqs, names, r)),
                         ("HF hooks", lambda r: run_hf(hf, torch, seqs, sites, r))):
            rows = open_rows(root / name.replace(" ", "_"), widths, total)
            t = time.perf_counter()
            fn(rows)
            close_rows(rows)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
            print(f"{name}: {total} tokens in {best[name]:.2f} s", flush=True)
    for s in sites:   # the same rows
        a = np.load(root / "ours" / f"{s.name}.npy", mmap_mode="r")
        b = np.load(root / "HF_hooks" / f"{s.name}.npy", mmap_mode="r")
        err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        print(f"{s.name}: ours vs HF max rel error {err:.1e}")
        if err > 1e-3:
            raise SystemExit(f"{s.name}: rows differ from HF's ({err:.1e})")
    rates = {k: (total / v, nbytes / v) for k, v in best.items()}
    if not args.no_pipeline:
        dt, toks, pbytes = run_pipeline(m, seqs, names, root)
        rates["ours, pipeline"] = (toks / dt, pbytes / dt)
    if args.saelens:
        dt, toks, sbytes = run_saelens(path, sites[0], widths[sites[0].name], args.texts, args.length,
                                       root)
        rates["SAELens cache"] = (toks / dt, sbytes / dt)
    print(f"\nmodel: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/"
          f"{args.kv_heads} intermediate={m.config['intermediate_size']}; {len(seqs)} texts, "
          f"{total} tokens; sites {', '.join(widths)} ({sum(widths.values())} floats per token); "
          f"{threads} threads; best of {args.repeats}")
    hf_rate = rates["HF hooks"][0]
    print(f"{'method':16s} {'tokens/s':>10s} {'GB/s':>8s} {'vs HF':>7s}")
    for k, (tps, bps) in rates.items():
        print(f"{k:16s} {tps:10.0f} {bps / 1e9:8.4f} {tps / hf_rate:6.2f}x")
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

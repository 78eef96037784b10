"""What hashing the weights' bytes (the model fingerprint) costs at load time:
a checkpoint loaded several times with the weight hashing on and off
(the fingerprint then covers config and tensor headers only): the median
wall time and CPU time (all threads) of `rl.Model(path, device="cpu")`
each; on a busy machine the CPU time is the steadier figure.

    python tests/bench_fingerprint.py [--model PATH] [--repeat 5]
                                      [--shape HIDDEN,LAYERS,HEADS,KV_HEADS]

--model: a GGUF file or HF directory (default: the default model).
--shape: also write a random bfloat16 Llama checkpoint of that shape (HF
directory, intermediate size 2 x hidden, vocabulary 320) into a temporary
directory and time it too; 2048,16,32,8 is about 0.6 B parameters (1.1 GB).
Not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def load_times(path: str, repeat: int, hashing: bool) -> tuple[float, float, str]:
    import rjepa_latent as rl
    from rjepa_latent.checkpoints import weight_hash
    add, fp = weight_hash.WeightHasher.add, weight_hash.WeightHasher.fingerprint
    if not hashing:
        weight_hash.WeightHasher.add = lambda self, *a, **k: None
        weight_hash.WeightHasher.fingerprint = lambda self, read: self.header
    try:
        times, cpu, fingerprint = [], [], ""
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            m = rl.Model(path, device="cpu")
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            fingerprint = m.fingerprint
            m.close()
        return statistics.median(times), statistics.median(cpu), fingerprint
    finally:
        weight_hash.WeightHasher.add, weight_hash.WeightHasher.fingerprint = add, fp


def report(name: str, path: str, repeat: int) -> None:
    import os
    size = sum(f.stat().st_size for f in Path(path).rglob("*")) if os.path.isdir(path) else os.path.getsize(path)
    load_times(path, 1, True)   # page cache warm for both
    off, off_cpu, _ = load_times(path, repeat, False)
    on, on_cpu, fp = load_times(path, repeat, True)
    print(f"{name}: {size / 2**20:,.0f} MiB on disk; load without weight hashing {off:.3f} s wall, "
          f"{off_cpu:.3f} s CPU; with {on:.3f} s wall ({on - off:+.3f} s), {on_cpu:.3f} s CPU "
          f"({on_cpu - off_cpu:+.3f} s, {100 * (on_cpu - off_cpu) / off_cpu:+.0f}%); "
          f"fingerprint {fp[:16]}...", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shape", default=None)
    args = ap.parse_args()
    from rjepa_latent.checkpoints.default_model import default_model_path
    report("model" if args.model else "default model", args.model or default_model_path(), args.repeat)
    if args.shape:
        from rjepa_latent.testing import tiny_model
        hidden, layers, heads, kv = (int(x) for x in args.shape.split(","))
        with tempfile.TemporaryDirectory(prefix="rjepa-bench-fp-") as tmp:
            t = time.perf_counter()
            path = tiny_model(Path(tmp) / "m", family="llama", hidden=hidden, layers=layers, heads=heads,
                              kv_heads=kv, dtype="bfloat16")
            print(f"wrote a {args.shape} bfloat16 Llama in {time.perf_counter() - t:.0f} s", flush=True)
            report(f"Llama {args.shape} (bfloat16 HF)", str(path), args.repeat)


if __name__ == "__main__":
    main()

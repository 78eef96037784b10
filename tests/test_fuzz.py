"""Fuzz: flip random bytes of a valid single-file checkpoint, many times, and
load each result. Every iteration must either load (and run a forward) or
raise ModelFormatError / ValueError; the loop runs in a subprocess so that a
crash (segfault, abort) shows up as its exit status instead of killing pytest."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from test_checkpoint import consolidate

ITERATIONS = 400

FUZZ_SCRIPT = textwrap.dedent("""
    import os, shutil, struct, sys
    import numpy as np
    import rjepa_latent as rl

    src, work, n_iter = sys.argv[1], sys.argv[2], int(sys.argv[3])
    good = open(os.path.join(src, "model.safetensors"), "rb").read()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    os.makedirs(work, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), work)
    rng = np.random.default_rng(1234)
    counts = {"loaded": 0, "refused": 0}
    for it in range(n_iter):
        data = bytearray(good)
        region = rng.integers(0, 10)
        for _ in range(int(rng.integers(1, 6))):
            if region < 2:      # the 8-byte length
                pos = int(rng.integers(0, 8))
            elif region < 8:    # the JSON header
                pos = int(rng.integers(8, header_end))
            else:               # tensor data
                pos = int(rng.integers(header_end, len(data)))
            data[pos] = int(rng.integers(0, 256)) if rng.random() < 0.5 else data[pos] ^ 0xFF
        if rng.random() < 0.1:  # sometimes also truncate or extend
            data = data[: int(rng.integers(0, len(data)))] if rng.random() < 0.5 else data + b"x"
        with open(os.path.join(work, "model.safetensors"), "wb") as f:
            f.write(data)
        try:
            m = rl.Model(work, device="cpu", max_batch_tokens=64)
            m.extract([[1, 2, 3, 4]], layers=(0, -1))
            counts["loaded"] += 1
        except (rl.ModelFormatError, ValueError) as e:
            assert str(e), "empty error message"
            counts["refused"] += 1
    print("FUZZ", counts["loaded"], counts["refused"])
""")


def test_fuzz_flipped_bytes_never_crash(tiny_model_dir, tmp_path):
    consolidate(tiny_model_dir("llama"), tmp_path / "good")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, str(tmp_path / "good"),
                           str(tmp_path / "work"), str(ITERATIONS)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("FUZZ")][-1]
    loaded, refused = map(int, line.split()[1:])
    assert loaded + refused == ITERATIONS
    assert loaded > 20 and refused > 100  # both outcomes were exercised

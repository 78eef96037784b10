"""Fuzz: flip random bytes of a valid single-file checkpoint, many times, and
load each result. Every iteration must either load (and run a forward) or
raise ModelFormatError / ValueError; the loop runs in a subprocess so that a
crash (segfault, abort) shows up as its exit status instead of killing pytest.
tests/fuzz_loaders.py fuzzes both loaders (safetensors and GGUF) with more kinds
of mutation; the last test runs 2,000 of its mutants."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

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


def test_fuzz_both_loaders_no_crash_no_hang(tmp_path):
    """tests/fuzz_loaders.py on 2,000 mutants (a quarter each of safetensors,
    GGUF, config.json and tokenizer.json: byte flips, truncations, inserted /
    deleted bytes, boundary integers, header and JSON edits), each loaded in a subprocess pool under a per-mutant alarm: every
    one loads or raises a named exception; none crashes or hangs."""
    pytest.importorskip("gguf")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_loaders.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, script, "--n", "2000", "--jobs", "2", "--alarm", "10",
                           "--json", "--keep", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    counts = json.loads([x for x in proc.stdout.splitlines() if x.startswith("FUZZJSON ")][-1][9:])
    for kind in ("safetensors", "gguf", "config", "tokenizer"):
        c = counts[kind]
        assert c.get("crash", 0) == 0 and c.get("hang", 0) == 0, proc.stdout
        assert sum(c.values()) == 500, proc.stdout
        # both outcomes exercised, and refusals are mostly the clean one
        assert c.get("loaded", 0) > 10 and c.get("refused", 0) > 200, proc.stdout
        assert counts["outcomes"][kind].get("ModelFormatError", 0) > 200, proc.stdout


def test_gguf_huge_array_length_is_refused_quickly(tmp_path):
    """Found by fuzz_loaders (seed 0, mutant 7405): a metadata array length
    flipped to ~2**63. gguf's reader reads past the end as empty arrays and
    looped for ever; the loader checks the key/value table first."""
    pytest.importorskip("gguf")
    import time
    import rjepa_latent as rl
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fuzz_loaders import write_gguf_seed
    good = write_gguf_seed(tmp_path / "good.gguf").read_bytes()
    key = b"tokenizer.ggml.tokens"
    at = good.index(key) + len(key) + 4 + 4   # after the key: u32 type ARRAY, u32 item type
    for n in (2 ** 63, 2 ** 64 - 1, len(good)):
        p = tmp_path / f"n{n}.gguf"
        p.write_bytes(good[:at] + n.to_bytes(8, "little") + good[at + 8:])
        t0 = time.perf_counter()
        with pytest.raises(rl.ModelFormatError, match="array of .* elements .* past the end"):
            rl.Model(p, device="cpu")
        assert time.perf_counter() - t0 < 5
    for n_kv in (2 ** 40, 2 ** 64 - 1):       # the key count itself
        p = tmp_path / f"kv{n_kv}.gguf"
        p.write_bytes(good[:16] + n_kv.to_bytes(8, "little") + good[24:])
        with pytest.raises(rl.ModelFormatError, match="past the end"):
            rl.Model(p, device="cpu")


def test_fuzz_harness_reports_crash_and_hang():
    """The harness itself: a mutant that dies by SIGSEGV counts as a crash, one
    that outlives the alarm as a hang, the mutants after them in the same
    worker still run, and the exit status is 1."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_loaders.py")
    env = dict(os.environ, FUZZ_SELFTEST="crash=5,hang=8", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, script, "--n", "12", "--jobs", "1", "--batch", "12",
                           "--alarm", "2", "--json"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    counts = json.loads([x for x in proc.stdout.splitlines() if x.startswith("FUZZJSON ")][-1][9:])
    assert counts["gguf"]["crash"] == 1 and counts["outcomes"]["gguf"]["crash(SIGSEGV)"] == 1
    assert counts["safetensors"]["hang"] == 1
    assert sum(sum(counts[k].values()) for k in ("safetensors", "gguf", "config", "tokenizer")) == 12
    assert "FAIL mutant 5 (gguf" in proc.stdout and "FAIL mutant 8 (safetensors" in proc.stdout

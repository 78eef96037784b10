"""The CPU backend's own GEMM (csrc/gemm_builtin.c) and its vectorized exp
(softmax, SiLU): bitwise the same on every ISA, whatever the batch
composition and thread count.

Each ISA's kernels are forced with RJEPA_CPU_ISA in a subprocess (the choice
is made when a CPU engine is created); an ISA this CPU does not run is
skipped, naming why. The results of every available ISA must be bitwise
equal, also with sequences packed together vs alone and with 1 vs 3 threads;
they match OpenBLAS (RJEPA_GEMM=openblas, where the build links it) and HF
to the parity bound. Bad settings are refused with a clear message.
The weight packed ahead (the form the CPU backend holds its GEMM weights in)
gives the same bits as the weight packed inside the call, on every ISA
(tests/backend_ops/test_gemm_pack.c, compiled with gemm_builtin.c alone).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import _core

from test_core_engine import make_config, make_engine, make_weights, ref_hidden_states, rel_err, run
from test_determinism import WIDE

ROOT = Path(__file__).resolve().parent.parent
ISAS = ("avx512", "avx2", "generic")
AVAILABLE = rl.build_info()["cpu_isas"].split()
OPENBLAS = rl.build_info()["blas"].startswith("scipy-openblas32")
# lengths cross the micro-tile heights (4, 6, 12 rows) and one panel width
LENGTHS = (300, 7, 1, 257, 13, 120)

SCRIPT = r"""
import json, sys
import numpy as np
sys.path[:0] = [sys.argv[1]]
from rjepa_latent import _core
from test_core_engine import make_config, make_engine, make_weights, run
from test_determinism import WIDE
cfg = make_config(**{**WIDE, **json.loads(sys.argv[4])}, attn_qkv_bias=1, attn_o_bias=1, mlp_bias=1)
w = make_weights(cfg, seed=21)
rng = np.random.default_rng(22)
seqs = [rng.integers(0, cfg["vocab_size"], n) for n in json.loads(sys.argv[2])]
spans = [[(0, len(s)), (len(s) // 2, len(s))] for s in seqs]
out, info = {}, {}
for threads in (1, 3):
    eng = make_engine(cfg, w, max_tokens=1024, n_threads=threads)
    info["kernel"] = eng.kernel
    out[f"packed{threads}"] = run(eng, seqs, [1, 2, 3], spans)
    out[f"alone{threads}"] = np.concatenate(
        [run(eng, [s], [1, 2, 3], [sp]) for s, sp in zip(seqs, spans)], 1)
np.savez(sys.argv[3], **out)
print(json.dumps(info))
"""


def _run_forced(tmp: Path, isa: str | None, gemm: str | None = None,
                cfg: dict | None = None) -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RJEPA_CPU_ISA", "RJEPA_GEMM")}
    if isa:
        env["RJEPA_CPU_ISA"] = isa
    if gemm:
        env["RJEPA_GEMM"] = gemm
    out = tmp / f"{isa}-{gemm}-{bool(cfg)}.npz"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "tests"), json.dumps(LENGTHS),
                        str(out), json.dumps(cfg or {})], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        return info, {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def default_isa_states(tmp_path_factory):
    return _run_forced(tmp_path_factory.mktemp("isa"), None)


def test_build_info_names_the_isas():
    info = rl.build_info()
    assert "generic" in AVAILABLE and set(AVAILABLE) <= set(ISAS)
    assert info["cpu_isa"] == (os.environ.get("RJEPA_CPU_ISA") or AVAILABLE[0])
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if os.uname().machine == "x86_64" and cpu_flags:
        flags = set(next(l for l in cpu_flags.splitlines() if l.startswith("flags")).split())
        assert ("avx512" in AVAILABLE) == ("avx512f" in flags)
        assert ("avx2" in AVAILABLE) == ({"avx2", "fma"} <= flags)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_gives_the_same_bits_packed_alone_any_threads(isa, default_isa_states, tmp_path):
    if isa not in AVAILABLE:
        pytest.skip(f"this CPU does not run {isa} code (it runs: {' '.join(AVAILABLE)}), so its "
                    "kernel cannot be compared here")
    info, got = _run_forced(tmp_path, isa)
    assert info["kernel"].startswith("rjepa fp32 GEMM"), info
    ref_info, ref = default_isa_states
    assert info == ref_info     # the kernel's name does not depend on the ISA: its bits do not
    base = got["packed1"]
    assert base.shape == (3, 2 * len(LENGTHS), WIDE["hidden_size"]) and np.abs(base).max() > 0.1
    for k, v in got.items():
        np.testing.assert_array_equal(v, base, err_msg=f"{isa}: {k} differs from packed1")
    # bitwise equal to the widest ISA's (the default)
    np.testing.assert_array_equal(base, ref["packed1"])


def test_weights_packed_ahead_give_the_same_bits(tmp_path):
    exe = tmp_path / "test_gemm_pack"
    cmd = [os.environ.get("CC", "cc"), "-O2", "-std=c11", "-fopenmp", "-ffp-contract=off", "-Wall",
           "-Wextra", "-Werror", "-I", str(ROOT / "csrc"),
           str(ROOT / "tests" / "backend_ops" / "test_gemm_pack.c"),
           str(ROOT / "csrc" / "gemm_builtin.c"), "-o", str(exe), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout[-4000:] + r.stderr
    for isa in AVAILABLE:   # each ISA this CPU runs was compared, none skipped
        assert re.search(rf"^{isa}: NR=(16|32), [1-9]\d* cases$", r.stdout, re.M), r.stdout
# the attention kernel's other paths: sliding window (layers 0 and 2), soft-capping,
# GQA 3:1 and a head_dim (40) that is not a multiple of the vector width (masked tails)
ATTN_VARIANTS = dict(hidden_size=96, intermediate_size=160, num_heads=6, num_kv_heads=2,
                     head_dim=40, sliding_window=37, layer_sliding=[1, 0, 1], attn_softcap=3.0)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_variants_give_the_same_bits_on_every_isa(isa, tmp_path):
    if isa not in AVAILABLE:
        pytest.skip(f"this CPU does not run {isa} code (it runs: {' '.join(AVAILABLE)})")
    _, got = _run_forced(tmp_path, isa, cfg=ATTN_VARIANTS)
    base = got["packed1"]
    assert np.isfinite(base).all() and np.abs(base).max() > 0.1
    for k, v in got.items():
        np.testing.assert_array_equal(v, base, err_msg=f"{isa}: {k} differs from packed1")
    if isa != AVAILABLE[0]:
        _, ref = _run_forced(tmp_path, AVAILABLE[0], cfg=ATTN_VARIANTS)
        np.testing.assert_array_equal(base, ref["packed1"], err_msg=f"{isa} vs {AVAILABLE[0]}")


def test_forcing_an_isa_this_cpu_lacks_is_refused():
    missing = [i for i in ISAS if i not in AVAILABLE]
    cfg = make_config()
    for bad, msg in [(m, f"RJEPA_CPU_ISA={m}, but this .* does not run {m}") for m in missing] + \
                    [("sse9", "RJEPA_CPU_ISA must be avx512, avx2 or generic.*'sse9'")]:
        r = subprocess.run([sys.executable, "-c", "from rjepa_latent import _core\n"
                            f"_core.Engine({cfg!r}, 'cpu', 1)"], capture_output=True, text=True,
                           env=dict(os.environ, RJEPA_CPU_ISA=bad), timeout=120)
        assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
        assert re.search(msg, r.stderr), r.stderr[-2000:]


def test_bad_gemm_setting_is_refused(monkeypatch):
    monkeypatch.setenv("RJEPA_GEMM", "mkl")
    with pytest.raises(Exception, match="RJEPA_GEMM must be builtin .* or openblas, got 'mkl'"):
        _core.Engine(make_config(), "cpu", 1)
    monkeypatch.setenv("RJEPA_GEMM", "openblas")
    if OPENBLAS:
        assert "openblas" in _core.Engine(make_config(), "cpu", 1).kernel.lower()
    else:
        with pytest.raises(Exception, match="links no OpenBLAS"):
            _core.Engine(make_config(), "cpu", 1)


@pytest.mark.skipif(not OPENBLAS, reason="this build links no OpenBLAS (RJEPA_BLAS=builtin)")
def test_openblas_stays_selectable_and_agrees(default_isa_states, tmp_path):
    info, got = _run_forced(tmp_path, None, gemm="openblas")
    assert "openblas" in info["kernel"].lower() and "core" in info["kernel"], info
    own = default_isa_states[1]["packed1"]
    for k, v in got.items():   # OpenBLAS per sequence: bitwise neutral too
        np.testing.assert_array_equal(v, got["packed1"], err_msg=k)
    assert max(rel_err(a, b) for a, b in zip(got["packed1"], own)) <= 1e-5


def test_own_gemm_matches_float64_reference_with_biases():
    cfg = make_config(**WIDE, attn_qkv_bias=1, attn_o_bias=1, mlp_bias=1)
    w = make_weights(cfg, seed=5)
    ids = np.random.default_rng(6).integers(0, cfg["vocab_size"], 77)
    eng = make_engine(cfg, w, n_threads=2)
    assert eng.kernel.startswith("rjepa fp32 GEMM")
    layers = list(range(cfg["num_layers"] + 1))
    got = run(eng, [ids], layers, [[(t, t + 1) for t in range(len(ids))]])
    ref = ref_hidden_states(cfg, w, ids)
    for l in layers:
        assert rel_err(got[l], ref[l]) <= 1e-5, l

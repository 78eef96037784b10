"""The CPU build without OpenBLAS (RJEPA_BLAS=builtin: csrc/gemm_builtin.c).

The extension is built CPU-only with the builtin C GEMM into a temporary
directory, next to a copy of the Python package, and run in a subprocess:
- it links no BLAS, never imports scipy_openblas32, says "builtin C GEMM"
  in build_info()["blas"] and names the engine's own GEMM in Engine.kernel;
- hidden states of tiny random HF checkpoints equal this build's bitwise
  (the same own GEMM, the default of every build) and HF's to the parity
  bound;
- packing stays bitwise neutral and results do not depend on the thread
  count (long sequences included, whose GEMMs run in column jobs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_hidden_states

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "qwen3", "llama_bias")
LENGTHS = (1, 37, 300)
TOL = 1e-5


def _build(tmp: Path, **extra_env: str) -> Path:
    """Builds the builtin-GEMM `_core` (CPU-only) under tmp and returns a
    directory holding `rjepa_latent` with it."""
    env = dict(os.environ, RJEPA_CUDA="0", RJEPA_BLAS="builtin", RJEPA_WERROR="1", **extra_env)
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                        str(tmp / "lib"), "--build-temp", str(tmp / "tmp")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    pkg = tmp / "pkg"
    shutil.copytree(ROOT / "rjepa_latent", pkg / "rjepa_latent",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (so,) = (tmp / "lib" / "rjepa_latent").glob("_core*.so")
    shutil.copy(so, pkg / "rjepa_latent")
    return pkg


@pytest.fixture(scope="module")
def builtin_pkg(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("builtin_gemm"))


SCRIPT = r"""
import json, sys
import numpy as np
pkg, tests, out, dirs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.path[:0] = [pkg, tests]
import rjepa_latent as rl
from rjepa_latent import _core
assert rl.__file__.startswith(pkg), rl.__file__
info = {"blas": rl.build_info()["blas"], "cuda": rl.build_info()["cuda"],
        "openblas_imported": "scipy_openblas32" in sys.modules}
states = {}
for arch, d in dirs.items():
    m = rl.Model(d, device="cpu", threads=2)
    info["kernel"] = m._engine.kernel
    for n in json.loads(sys.argv[5]):
        ids = np.random.default_rng(n).integers(0, 320, n)
        states[f"{arch}/{n}"] = m.hidden_states(ids)
    m.close()

# packing and thread count (the WIDE config of test_determinism: column jobs)
from test_core_engine import make_config, make_engine, make_weights, run
from test_determinism import WIDE
cfg = make_config(**WIDE)
w = make_weights(cfg, seed=11)
rng = np.random.default_rng(12)
seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (300, 7, 257, 120)]
spans = [[(0, len(s)), (len(s) // 2, len(s))] for s in seqs]
by_threads = {}
for threads in (1, 3):
    eng = make_engine(cfg, w, max_tokens=1024, n_threads=threads)
    packed = run(eng, seqs, [1, 2, 3], spans)
    alone = np.concatenate([run(eng, [s], [1, 2, 3], [sp]) for s, sp in zip(seqs, spans)], 1)
    info[f"packing_bitwise_{threads}"] = bool(np.array_equal(packed, alone))
    by_threads[threads] = packed
info["threads_bitwise"] = bool(np.array_equal(by_threads[1], by_threads[3]))
states["wide"] = by_threads[1]
np.savez(out, **states)
print(json.dumps(info))
"""


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Relative error per layer (axis 0), as in test_model_parity."""
    diff = np.linalg.norm((ours - ref).reshape(len(ref), -1), axis=1)
    return diff / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)


def test_builtin_gemm_build_matches_openblas_build_and_hf(builtin_pkg, tiny_model_dir, tmp_path):
    import rjepa_latent as rl
    dirs = {a: str(tiny_model_dir(a)) for a in ARCHS}
    out = tmp_path / "builtin.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(builtin_pkg), str(ROOT / "tests"),
                        str(out), json.dumps(dirs), json.dumps(LENGTHS)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {"blas": "builtin C GEMM", "cuda": False, "openblas_imported": False,
                    "kernel": "rjepa fp32 GEMM (fma, fixed summation order; avx512 = avx2 = generic)",
                    "packing_bitwise_1": True, "packing_bitwise_3": True,
                    "threads_bitwise": True}, info
    (so,) = (builtin_pkg / "rjepa_latent").glob("_core*.so")
    assert b"openblas" not in subprocess.run(["ldd", str(so)], capture_output=True).stdout.lower()

    got = np.load(out)
    worst = {}
    for arch in ARCHS:
        m = rl.Model(dirs[arch], device="cpu", threads=2)
        for n in LENGTHS:
            ids = np.random.default_rng(n).integers(0, 320, n)
            ours = got[f"{arch}/{n}"]
            ob = m.hidden_states(ids)
            hf = hf_hidden_states(dirs[arch], ids)
            assert ours.shape == ob.shape == hf.shape
            e_hf = _rel_err(ours, hf).max()
            worst[arch] = max(worst.get(arch, 0.0), e_hf)
            assert e_hf <= TOL, f"{arch} T={n}: builtin vs HF {e_hf:.3g}"
            assert np.array_equal(ours, ob)   # the same own GEMM in both builds
            assert not np.array_equal(ours, np.zeros_like(ours))
        m.close()
    print("\nworst relative error builtin vs HF:", ", ".join(f"{a} {e:.2e}" for a, e in worst.items()))

    from test_core_engine import make_config, make_engine, make_weights, run
    from test_determinism import WIDE
    cfg = make_config(**WIDE)
    w = make_weights(cfg, seed=11)
    rng = np.random.default_rng(12)
    seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (300, 7, 257, 120)]
    spans = [[(0, len(s)), (len(s) // 2, len(s))] for s in seqs]
    ob = run(make_engine(cfg, w, max_tokens=1024, n_threads=2), seqs, [1, 2, 3], spans)
    np.testing.assert_array_equal(got["wide"], ob)

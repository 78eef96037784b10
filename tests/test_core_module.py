"""The `_core` module itself: multi-phase init (PEP 489) and backend
capabilities.

- Import in a fresh interpreter, `importlib.reload`, and a second,
  independent module object made from the same spec: each keeps working and
  raises the classes of `rjepa_latent.errors` (kept in module state, not in
  process-global C variables).
- Capabilities: what a backend supports is known without a device and is
  checked before any weight is allocated, so an unsupported model fails at
  once with a message naming what is unsupported and what is supported.
"""
from __future__ import annotations

import ctypes as C
import gc
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rjepa_latent import _native  # noqa: F401  (loads _core)
from rjepa_latent import _core
from rjepa_latent.errors import DeviceError, DeviceMemoryError

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=16, max_layer=1, rms_norm_eps=1e-6)


def _tiny_engine(core, n_threads=1):
    rng = np.random.default_rng(0)
    eng = core.Engine(TINY, "cpu", n_threads)
    for kind, layer, shape in core.tensor_layout(TINY):
        arr = (rng.standard_normal(shape) * 0.5 + (1.0 if "norm" in kind else 0.0))
        eng.set_tensor(kind, layer, arr.astype(np.float32), "float32", shape)
    eng.check_complete()
    eng.reserve(8)
    return eng


def _forward(eng):
    return eng.forward(np.array([1, 2, 3, 4], np.int32), np.array([0, 4], np.int32),
                       np.array([0, 1], np.int32), np.array([[0, 4], [1, 2]], np.int32),
                       np.array([0, 0], np.int32), "mean")


# ---- module init ------------------------------------------------------------

SUBPROCESS = textwrap.dedent("""
    import gc, importlib, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import rjepa_latent
    from rjepa_latent import _native, errors
    core = _native._core
    again = importlib.reload(core)
    assert again is core, "reload must keep the executed module"
    try:
        core.cuda_check_device(999)
    except errors.DeviceError as e:
        kind = type(e) is errors.DeviceError
    else:
        raise SystemExit("no DeviceError")
    try:
        core.Engine({"vocab_size": 4, "hidden_size": 4, "intermediate_size": 4, "num_layers": 1,
                     "num_heads": 1, "num_kv_heads": 1, "head_dim": 16, "rms_norm_eps": 0.0},
                    "cuda:999")
    except errors.DeviceError:
        pass
    print("ok", kind, core.Engine.__module__, type(core.__spec__.loader).__name__)
""")


def test_import_and_reload_in_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-c", SUBPROCESS, str(ROOT)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "True", "rjepa_latent._core", "ExtensionFileLoader"]


def test_reload_keeps_the_module_working():
    before = _core.Engine
    mod = importlib.reload(_core)
    assert mod is _core and mod.Engine is before
    eng = _tiny_engine(mod)
    assert _forward(eng).shape == (2, 2, 8)
    with pytest.raises(DeviceError):
        mod.cuda_check_device(999)


def test_a_second_module_object_is_independent():
    """With multi-phase init, module_from_spec gives a new module object
    whose types and state are its own; it raises the same error classes,
    and its results outlive it."""
    spec = importlib.util.find_spec("rjepa_latent._core")
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)
    assert second is not _core
    assert second.Engine is not _core.Engine and second.HostBuffer is not _core.HostBuffer
    eng = _tiny_engine(second)
    out = _forward(eng)
    want = _forward(_tiny_engine(_core))
    assert np.array_equal(out, want)
    assert type(out.base) is second.HostBuffer and not isinstance(out.base, _core.HostBuffer)
    with pytest.raises(DeviceError) as info:
        second.Engine(TINY, "cuda:999")
    assert type(info.value) in (DeviceError, DeviceMemoryError)
    with pytest.raises(ValueError, match="head_dim must be even"):
        second.Engine({**TINY, "head_dim": 3}, "cpu")
    keep = out.copy()
    del eng, second
    gc.collect()
    assert np.array_equal(out, keep)   # the result holds its type, which holds its module
    del out
    gc.collect()


def test_types_are_final_and_hostbuffer_not_constructible():
    with pytest.raises(TypeError):
        _core.HostBuffer()
    with pytest.raises(TypeError):
        type("Sub", (_core.Engine,), {})
    with pytest.raises(TypeError):
        _core.Engine.forward = None   # immutable type


# ---- capabilities -------------------------------------------------------------

def test_cpu_caps():
    assert _core.backend_caps("cpu") == {
        "device": "cpu", "dtypes": ["float32"], "poolings": ["mean", "first", "last", "max"],
        "head_dims": None, "max_heads": None,
        "features": ["embed_scale", "norm_offset", "act=gelu_tanh", "post-norms", "no pre-norms",
                     "qk_norm=whole projection", "attn_softcap", "sliding_window", "rope_swa"]}
    eng = _core.Engine(TINY, "cpu", 1)
    assert eng.caps == _core.backend_caps("cpu")
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        _ = eng.caps
    _core.check_config(TINY, "cpu")
    with pytest.raises(ValueError, match=r"dtype 'bfloat16' is not available on device 'cpu' "
                                         r"\(its storage dtypes: 'float32'\)"):
        _core.check_config(TINY, "cpu", "bfloat16")


def _huge(**over):
    # every field valid, but the embedding alone is 2^60 elements
    return {**TINY, "vocab_size": 2 ** 30, "hidden_size": 2 ** 30, "intermediate_size": 8,
            "num_heads": 2, "num_kv_heads": 1, "head_dim": 64, **over}


def test_unsupported_dtype_fails_before_any_allocation():
    """A huge model the CPU cannot store in bfloat16 fails on the capability
    (ValueError, at once), not on the allocation the same model reaches in
    float32 (MemoryError): the check comes first."""
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"dtype 'bfloat16' is not available on device 'cpu'"):
        _core.Engine(_huge(), "cpu", 1, dtype="bfloat16")
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(MemoryError, match="cannot allocate"):
        _core.Engine(_huge(), "cpu", 1, dtype="float32")


def test_cuda_caps_known_without_a_device():
    if not _core.build_info()["cuda"]:
        with pytest.raises(DeviceError, match="not built in"):
            _core.backend_caps("cuda:0")
        # a CPU-only build still plans for CUDA (capabilities unknown there)
        assert _core.plan_bytes({**TINY, "head_dim": 24}, "cuda:0", 4)[0] > 0
        return
    caps = _core.backend_caps("cuda:3")
    assert caps == {"device": "cuda:3", "dtypes": ["float32", "bfloat16"],
                    "poolings": ["mean", "first", "last", "max"],
                    "head_dims": [16, 32, 64, 80, 96, 128, 256], "max_heads": 65535,
                    "features": caps["features"]}
    msg = (r"device 'cuda:0' cannot run this model: head_dim 24 is not supported by its "
           r"attention kernel \(supported head_dim: 16, 32, 64, 80, 96, 128, 256\)")
    t0 = time.perf_counter()
    for call in (lambda: _core.Engine(_huge(head_dim=24), "cuda:0"),
                 lambda: _core.plan_bytes(_huge(head_dim=24), "cuda", 16),
                 lambda: _core.check_config(_huge(head_dim=24), "cuda:0", "float32")):
        with pytest.raises(ValueError, match=msg):
            call()
    assert time.perf_counter() - t0 < 0.5   # no device, no CUDA context, no allocation
    with pytest.raises(ValueError, match=r"num_heads 70000 is more than its attention kernel "
                                         r"runs \(at most 65535\)"):
        _core.check_config({**TINY, "num_heads": 70000, "num_kv_heads": 1}, "cuda:0")


# ---- the same checks through the C API (ctypes) ---------------------------------

class Config(C.Structure):
    _fields_ = [(n, C.c_int64) for n in ("vocab_size", "hidden_size", "intermediate_size",
                                         "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                         "max_layer")] + \
               [("rms_norm_eps", C.c_double)] + \
               [(n, C.c_int) for n in ("attn_qkv_bias", "attn_o_bias", "mlp_bias", "qk_norm")] + \
               [("embed_scale", C.c_float), ("norm_offset", C.c_float), ("act", C.c_int),
                ("norms", C.c_int), ("attn_scale", C.c_float), ("attn_softcap", C.c_float),
                ("sliding_window", C.c_int64), ("layer_sliding", C.c_uint8 * 512),
                ("rope_swa", C.c_int)]


class Caps(C.Structure):
    _fields_ = [("dtypes", C.c_uint), ("poolings", C.c_uint), ("head_dims", C.POINTER(C.c_int16)),
                ("n_head_dims", C.c_int), ("max_heads", C.c_int64), ("features", C.c_uint)]


OPS = ("alloc", "free", "host_alloc", "host_release", "upload", "upload_i32", "download_f32",
       "download_f32_async", "sync", "mem_info", "is_resident", "embed", "rmsnorm", "gemm", "qk_norm_rope", "attention",
       "glu", "cast", "pool", "destroy")


class Backend(C.Structure):
    _fields_ = [("name", C.c_char_p), ("kernel", C.c_char_p), ("weight_dtype", C.c_int),
                ("act_dtype", C.c_int), ("res_dtype", C.c_int), ("impl", C.c_void_p)] + \
               [(n, C.c_void_p) for n in OPS] + [("caps", C.POINTER(Caps))]


class Batch(C.Structure):
    _fields_ = [("tokens", C.POINTER(C.c_int32)), ("n_tokens", C.c_int64),
                ("cu_seqlens", C.POINTER(C.c_int32)), ("n_seqs", C.c_int64),
                ("layers", C.POINTER(C.c_int32)), ("n_layers", C.c_int64),
                ("spans", C.POINTER(C.c_int32)), ("span_seq", C.POINTER(C.c_int32)),
                ("n_spans", C.c_int64), ("poolings", C.POINTER(C.c_int)), ("n_poolings", C.c_int64)]


class Result(C.Structure):
    _fields_ = [("data", C.c_void_p), ("n_poolings", C.c_int64), ("n_layers", C.c_int64),
                ("n_spans", C.c_int64), ("hidden", C.c_int64), ("release", C.c_void_p)]


@pytest.fixture(scope="module")
def lib():
    L = C.CDLL(_core.__file__)
    L.rl_last_error.restype = C.c_char_p
    L.rl_backend_cpu_create.argtypes = [C.c_int, C.POINTER(C.POINTER(Backend))]
    L.rl_model_create.argtypes = [C.POINTER(Config), C.POINTER(Backend), C.POINTER(C.c_void_p)]
    L.rl_model_set_tensor.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_void_p, C.c_int,
                                      C.POINTER(C.c_int64), C.c_int]
    L.rl_model_reserve.argtypes = [C.c_void_p, C.c_int64]
    L.rl_model_forward.argtypes = [C.c_void_p, C.POINTER(Batch), C.POINTER(Result)]
    L.rl_model_free.argtypes = [C.c_void_p]
    L.rl_backend_caps_get.argtypes = [C.c_int, C.POINTER(Caps)]
    L.rl_caps_check_config.argtypes = [C.POINTER(Caps), C.c_char_p, C.POINTER(Config), C.c_int]
    return L


def _cfg(**over) -> Config:
    return Config(**{**TINY, **over})


def test_model_create_checks_caps_before_allocating(lib):
    """rl_model_create on a CPU backend whose capabilities are replaced by a
    CUDA-like list: a huge model with an unlisted head_dim is refused with
    RL_ERR_INVALID at once; with a listed one it reaches the allocation
    (RL_ERR_NOMEM), so the check runs first."""
    dims = (C.c_int16 * 2)(32, 64)
    fake = Caps(dtypes=1, poolings=15, head_dims=dims, n_head_dims=2, max_heads=0)
    results = {}
    for hd in (48, 64):
        be = C.POINTER(Backend)()
        assert lib.rl_backend_cpu_create(1, C.byref(be)) == 0
        be.contents.caps = C.pointer(fake)
        m = C.c_void_p()
        t0 = time.perf_counter()
        st = lib.rl_model_create(C.byref(_cfg(**{k: v for k, v in _huge(head_dim=hd).items()})),
                                 be, C.byref(m))
        results[hd] = (st, lib.rl_last_error().decode(), time.perf_counter() - t0)
        assert not m.value   # the backend was destroyed with the failure
    st, msg, dt = results[48]
    assert st == 1 and dt < 0.5, results
    assert "device 'cpu' cannot run this model: head_dim 48 is not supported by its attention " \
           "kernel (supported head_dim: 32, 64)" in msg
    assert results[64][0] == 2 and "cannot allocate" in results[64][1]   # RL_ERR_NOMEM


def test_unsupported_pooling_id_fails_before_the_result_is_allocated(lib):
    be = C.POINTER(Backend)()
    assert lib.rl_backend_cpu_create(1, C.byref(be)) == 0
    m = C.c_void_p()
    cfg = _cfg(max_layer=0)   # only the embedding and RoPE table are loaded
    assert lib.rl_model_create(C.byref(cfg), be, C.byref(m)) == 0, lib.rl_last_error()
    try:
        emb = np.arange(11 * 8, dtype=np.float32)
        inv = np.ones(8, np.float32)
        for kind, arr in ((0, emb), (2, inv)):
            shape = (C.c_int64 * 2)(*((11, 8) if kind == 0 else (8, 0)))
            assert lib.rl_model_set_tensor(m, kind, 0, arr.ctypes.data, 0, shape,
                                           2 if kind == 0 else 1) == 0, lib.rl_last_error()
        assert lib.rl_model_reserve(m, 8) == 0
        tok = (C.c_int32 * 3)(1, 2, 3)
        cu = (C.c_int32 * 2)(0, 3)
        layers = (C.c_int32 * 1)(0)
        spans = (C.c_int32 * 2)(0, 3)
        seq = (C.c_int32 * 1)(0)
        res = Result(data=123)
        for pooling, want in ((0, 0), (2, 0), (3, 0), (4, 1), (-1, 1), (40, 1)):
            pools = (C.c_int * 1)(pooling)
            b = Batch(tok, 3, cu, 1, layers, 1, spans, seq, 1, pools, 1)
            assert lib.rl_model_forward(m, C.byref(b), C.byref(res)) == want, pooling
            if want:
                assert res.data is None    # nothing was allocated for it
                assert (f"pooling {pooling} is not supported by cpu (it supports 'mean', "
                        f"'first', 'last', 'max'") in lib.rl_last_error().decode()
            else:
                out = np.ctypeslib.as_array(C.cast(res.data, C.POINTER(C.c_float)), (8,))
                ref = emb.reshape(11, 8)[1:4]
                want_out = {0: ref.mean(0), 2: ref[-1], 3: ref.max(0)}[pooling]
                assert np.allclose(out, want_out)
                lib.rl_result_free(C.byref(res))
    finally:
        lib.rl_model_free(m)


def test_caps_get_and_check_in_c(lib):
    caps = Caps()
    assert lib.rl_backend_caps_get(-1, C.byref(caps)) == 0
    assert (caps.dtypes, caps.poolings, bool(caps.head_dims), caps.max_heads) == (1, 15, False, 0)
    assert lib.rl_caps_check_config(C.byref(caps), b"cpu", C.byref(_cfg()), 0) == 0
    assert lib.rl_caps_check_config(C.byref(caps), b"cpu", C.byref(_cfg()), 1) == 1
    assert b"its storage dtypes: 'float32'" in lib.rl_last_error()
    st = lib.rl_backend_caps_get(0, C.byref(caps))
    if _core.build_info()["cuda"]:
        assert st == 0 and caps.dtypes == 0b011 and caps.n_head_dims == 7
    else:
        assert st == 3 and b"not built in" in lib.rl_last_error()


# ---- loading: the OpenBLAS build with a stale rpath ------------------------------

STALE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    if sys.argv[2] == "hide":
        sys.modules["scipy_openblas32"] = None      # as if the wheel were not installed
    try:
        import rjepa_latent as rl
    except ImportError as e:
        print("ImportError", e)
        raise SystemExit(0)
    assert rl.__file__.startswith(sys.argv[1])
    print("loaded", "scipy_openblas32" in sys.modules, rl.build_info()["blas"][:16])
""")


def test_openblas_build_with_a_stale_rpath_loads_through_the_wheel(tmp_path):
    """_native imports _core directly; only when the OpenBLAS it links is not
    found (an rpath that no longer holds) does it open the library from the
    installed scipy_openblas32 wheel and retry, and without the wheel it says
    what to do."""
    if not _core.build_info()["blas"].startswith("scipy-openblas32"):
        pytest.skip("this build links no OpenBLAS")
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "rjepa_latent", pkg / "rjepa_latent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (so,) = (pkg / "rjepa_latent").glob("_core*.so")
    data = so.read_bytes()
    key = b"scipy_openblas32/lib"
    assert key in data
    so.write_bytes(data.replace(key, b"scipy_openblasXX/lib"))   # same length: a stale path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    outs = []
    for mode in ("plain", "hide"):
        r = subprocess.run([sys.executable, "-c", STALE_SCRIPT, str(pkg), mode], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == "loaded True scipy-openblas32"
    assert outs[1].startswith("ImportError rjepa_latent._core was built with OpenBLAS, which "
                              "cannot be loaded") and "RJEPA_BLAS=builtin" in outs[1], outs[1]

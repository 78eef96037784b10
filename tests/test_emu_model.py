"""A tiny model's forward on a CUDA device against this package's CPU engine
(marked `gpu`: it runs where a CUDA device exists, which includes the
emulated device of an RJEPA_CUDA=emu build, where CI runs it).

Both attention kernels (tensor-core mma and RJEPA_ATTN=fma), bf16 and fp32
storage, lengths around the 64-query attention tile, several sequences
packed in one forward with every pooling, results used after close(). The
reference is the CPU engine in fp32 (itself held to HF by the parity
tests): fp32 within 1e-4 relative per layer; bf16 within BF16_REL, several
times what bf16 rounding costs these tiny models (about 0.03 at the last
layer) and far below what a wrong kernel gives (errors of order 1).
On the emulated device the run also says it is emulated (engine_kernel).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ids_of, rel_err

pytestmark = pytest.mark.gpu

FP32_REL = 1e-4
BF16_REL = 0.08
LENGTHS = (1, 63, 64, 65, 130)


def _cuda_or_skip():
    import rjepa_latent as rl
    from rjepa_latent import _core
    if not rl.build_info()["cuda"]:
        pytest.skip("CUDA not compiled in")
    if _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    return rl


@pytest.mark.parametrize("attn", ["mma", "fma"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_forward_matches_the_cpu_engine(tiny_model_dir, monkeypatch, arch, dtype, attn):
    rl = _cuda_or_skip()
    if attn == "fma":
        monkeypatch.setenv("RJEPA_ATTN", "fma")
    else:
        monkeypatch.delenv("RJEPA_ATTN", raising=False)
    path = str(tiny_model_dir(arch))
    seqs = [ids_of(n, 10 + n) for n in LENGTHS]
    with rl.Model(path, device="cpu", dtype="float32") as cpu:
        refs = [cpu.hidden_states(s) for s in seqs]
        spans = [np.array([[0, len(s)], [len(s) // 2, len(s)]]) for s in seqs]
        pooled_ref = cpu.extract(seqs, spans, layers=(1, -1), pooling=("mean", "max", "last"))
    m = rl.Model(path, device="cuda", dtype=dtype)
    bound = FP32_REL if dtype == "float32" else BF16_REL
    expect_kernel = "attention fma" if dtype == "float32" or attn == "fma" else "attention mma"
    assert expect_kernel in m.kernel, m.kernel
    if "emulated" in rl.build_info()["cuda_arch"]:
        assert m.kernel.startswith("emulated sm_90 on the CPU"), m.kernel
    for s, ref in zip(seqs, refs):
        got = m.hidden_states(s)
        assert np.isfinite(got).all()
        assert rel_err(got, ref).max() <= bound, (len(s), rel_err(got, ref))
    pooled = m.extract(seqs, spans, layers=(1, -1), pooling=("mean", "max", "last"))
    m.close()  # results stay valid after the model is gone
    for got, ref in zip(pooled, pooled_ref):
        got, ref = np.asarray(got), np.asarray(ref)
        assert got.shape == ref.shape and np.isfinite(got).all()
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= bound, err


def test_emulated_counters_see_a_forward_and_no_device_memory_leaks(tiny_model_dir):
    """On the emulated device only: its counters see the forward's launches,
    GEMMs and syncs, a batch waits for the device exactly once, and close()
    gives back every byte of device memory."""
    rl = _cuda_or_skip()
    if "emulated" not in rl.build_info()["cuda_arch"]:
        pytest.skip("not the emulated device")
    import ctypes as C

    from rjepa_latent import _core
    from test_emu_device import Counters
    lib = C.CDLL(_core.__file__)
    lib.rl_emu_get_counters.argtypes, lib.rl_emu_get_counters.restype = [C.c_void_p], None

    def now() -> Counters:
        c = Counters()
        lib.rl_emu_get_counters(C.byref(c))
        return c

    before = now()
    m = rl.Model(str(tiny_model_dir("llama")), device="cuda")
    loaded = now()
    assert loaded.device_bytes_in_use > before.device_bytes_in_use
    out = m.extract([ids_of(70, 1), ids_of(9, 2)], layers=(-1,), pooling="mean")
    after = now()
    assert after.launches > loaded.launches and after.gemms > loaded.gemms
    assert after.stream_syncs + after.event_syncs > loaded.stream_syncs + loaded.event_syncs
    # one batch waits once (the event after its one asynchronous download),
    # whatever the poolings and layers; no blocking copy, no stream sync
    spans = [np.array([[0, 10], [10, 70]], np.int32), np.array([[0, 9]], np.int32)]
    for args in ((None, (-1,), "mean"), (None, (0, 1, -1), ("mean", "max")), (None, (-1,), "none"),
                 (spans, (-2, -1), ("mean", "last"))):
        a = now()
        m.extract([ids_of(70, 1), ids_of(9, 2)], *args)
        b = now()
        waits = (b.stream_syncs - a.stream_syncs, b.event_syncs - a.event_syncs,
                 b.device_syncs - a.device_syncs, b.blocking_copies - a.blocking_copies)
        assert waits == (0, 1, 0, 0), (args[1:], waits)
    m.close()
    assert now().device_bytes_in_use == before.device_bytes_in_use
    assert all(np.isfinite(np.asarray(o)).all() for o in out)

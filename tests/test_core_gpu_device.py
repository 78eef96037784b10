"""On a CUDA device (skipped elsewhere): the pinned result pool and the
calling thread's current device, on the real runtime (their host logic is
also tested without a GPU in test_core_cuda_mock.py). On the emulated device
of a RJEPA_CUDA=emu test build the pool tests run on its runtime; the
current-device test needs torch's CUDA and skips there."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from rjepa_latent import _native  # noqa: F401  (loads _core)
from rjepa_latent import _core

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _core.build_info()["cuda"] or _core.cuda_device_count() == 0,
                                 reason="needs a CUDA device")]

CFG = dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
           num_kv_heads=2, head_dim=16, max_layer=2, rms_norm_eps=1e-6)


def _engine(device: str, dtype: str = "float32"):
    rng = np.random.default_rng(0)
    eng = _core.Engine(CFG, device, dtype=dtype)
    for kind, layer, shape in _core.tensor_layout(CFG):
        arr = rng.standard_normal(shape) * 0.3 + (1.0 if "norm" in kind else 0.0)
        if kind == "rope_inv_freq":
            arr = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
        eng.set_tensor(kind, layer, arr.astype(np.float32), "float32", shape)
    eng.check_complete()
    eng.reserve(64)
    return eng


def _forward(eng, n_spans: int = 20):
    toks = (np.arange(40) % 50).astype(np.int32)
    spans = np.array([[i, i + 1] for i in range(n_spans)], np.int32)
    return eng.forward(toks, np.array([0, 40], np.int32), np.array([1, 2], np.int32), spans,
                       np.zeros(n_spans, np.int32), "mean")


def test_results_come_from_the_pinned_pool_and_outlive_the_engine():
    eng = _engine("cuda:0")
    first = _forward(eng)
    want = first.copy()
    s1 = _core.cuda_pinned_pool()
    assert s1["live_bytes"] >= first.nbytes
    del first
    gc.collect()
    s2 = _core.cuda_pinned_pool()
    assert s2["live_bytes"] < s1["live_bytes"] and s2["cached_bytes"] > 0
    again = _forward(eng)                      # same size class: served from the pool
    s3 = _core.cuda_pinned_pool()
    assert s3["reused"] == s2["reused"] + 1 and s3["allocated"] == s2["allocated"]
    np.testing.assert_array_equal(again, want)
    eng.close()
    np.testing.assert_array_equal(again, want)  # the block is the result's, not the engine's
    del again
    gc.collect()
    assert _core.cuda_pinned_pool(trim=True)["cached_bytes"] == 0


def test_many_threads_allocate_and_release_results():
    eng = _engine("cuda:0")
    want = _forward(eng)
    bad = []

    def work():
        for _ in range(20):
            out = _forward(eng)
            if not np.array_equal(out, want):
                bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    del want
    gc.collect()
    s = _core.cuda_pinned_pool()
    assert s["cached_bytes"] <= s["cap_bytes"]


def test_torch_current_device_is_left_alone():
    if str(_core.build_info()["cuda_arch"]).startswith("emulated"):
        pytest.skip("the emulated CUDA device is not torch's: there is no torch device to leave alone")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    n = min(torch.cuda.device_count(), _core.cuda_device_count())
    torch.cuda.set_device(0)
    engines = {d: _engine(f"cuda:{d}") for d in range(min(n, 2))}
    outs = {d: _forward(e) for d, e in engines.items()}
    assert torch.cuda.current_device() == 0
    if n >= 2:
        torch.cuda.set_device(1)
        _forward(engines[0])
        _core.cuda_mem_info(0)
        assert torch.cuda.current_device() == 1
        np.testing.assert_array_equal(_forward(engines[1]), outs[1])
        assert torch.cuda.current_device() == 1
        torch.cuda.set_device(0)
    x = torch.ones(4, device="cuda")           # torch still works on its own device
    assert x.device.index == 0 and float(x.sum()) == 4.0
    for e in engines.values():
        e.close()
    assert torch.cuda.current_device() == 0

"""The engine storage dtype (`Model(..., dtype=)`, `memory_plan(dtype=)`,
`_core.Engine(dtype=)`, `_core.plan_bytes(dtype=)`), checked on the CPU.

"float32" is the only CPU dtype; "bfloat16" (default) and "float32" (the fp32
reference mode) are the CUDA ones. The CUDA side of the accounting is pure
arithmetic, so plan_bytes for "cuda:0" is checked here without a device; the
CUDA engine itself is tested in tests/test_gpu_model.py (gpu-marked).
"""
from __future__ import annotations

import pathlib
from typing import Callable

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import _core
from rjepa_latent.checkpoints.checkpoint import engine_config, load_hf_config


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[[str], pathlib.Path]) -> pathlib.Path:
    return tiny_model_dir("llama")


def _eng_cfg(directory: pathlib.Path) -> dict:
    public, _ = load_hf_config(directory)
    return engine_config(public, public["num_layers"])


def test_cpu_default_and_explicit_float32_agree(llama_dir):
    ids = np.arange(1, 40, dtype=np.int32)
    default = rl.Model(llama_dir, device="cpu")
    explicit = rl.Model(llama_dir, device="cpu", dtype="float32")
    assert default.dtype == explicit.dtype == "float32"
    assert "dtype='float32'" in repr(explicit)
    np.testing.assert_array_equal(default.hidden_states(ids), explicit.hidden_states(ids))


@pytest.mark.parametrize("bad", ["bfloat16"])
def test_cpu_refuses_bfloat16(llama_dir, bad):
    with pytest.raises(ValueError, match=r"dtype 'bfloat16' is not available on device 'cpu'"):
        rl.Model(llama_dir, device="cpu", dtype=bad)
    with pytest.raises(ValueError, match=r"'bfloat16'.*'cpu'"):
        rl.memory_plan(llama_dir, device="cpu", dtype=bad)


@pytest.mark.parametrize("bad", ["float16", "fp32", "", "BFLOAT16", 32, np.float32])
def test_unknown_dtype_is_named(llama_dir, bad):
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'bfloat16'.*got"):
        rl.Model(llama_dir, device="cpu", dtype=bad)
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'bfloat16'"):
        rl.memory_plan(llama_dir, device="cpu", dtype=bad)


def test_memory_plan_float32_equals_default_on_cpu(llama_dir):
    a = rl.memory_plan(llama_dir, device="cpu", max_batch_tokens=300)
    b = rl.memory_plan(llama_dir, device="cpu", max_batch_tokens=300, dtype="float32")
    assert a == b and a["dtype"] == "float32"
    m = rl.Model(llama_dir, device="cpu", max_batch_tokens=300, dtype="float32")
    rep = m.memory_report()
    assert (rep["weight_bytes"], rep["workspace_bytes"]) == (a["weight_bytes"], a["workspace_bytes"])


def test_core_engine_dtype(llama_dir):
    cfg = _eng_cfg(llama_dir)
    assert _core.Engine(cfg, "cpu", 1).dtype == "float32"
    assert _core.Engine(cfg, "cpu", 1, dtype="float32").dtype == "float32"
    with pytest.raises(ValueError, match=r"dtype 'bfloat16' is not available on device 'cpu'"):
        _core.Engine(cfg, "cpu", 1, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'bfloat16', got 'int8'"):
        _core.Engine(cfg, "cpu", 1, dtype="int8")
    with pytest.raises(TypeError):
        _core.Engine(cfg, "cpu", 1, dtype=4)


def test_plan_bytes_per_dtype(llama_dir):
    """CUDA fp32 stores what the CPU stores; CUDA bf16 halves every weight but
    the f32 RoPE frequencies, and every GEMM operand but the f32 residual."""
    cfg = _eng_cfg(llama_dir)
    T = 128
    cpu = _core.plan_bytes(cfg, "cpu", T)
    assert _core.plan_bytes(cfg, "cpu", T, dtype="float32") == cpu
    assert _core.plan_bytes(cfg, "cuda:0", T, dtype="float32") == cpu
    bf16 = _core.plan_bytes(cfg, "cuda:0", T, dtype="bfloat16")
    assert _core.plan_bytes(cfg, "cuda:0", T) == bf16  # the CUDA default
    rope = 4 * (cfg["head_dim"] // 2)
    assert bf16[0] == (cpu[0] - rope) // 2 + rope
    assert bf16[1] < cpu[1]
    with pytest.raises(ValueError, match=r"'bfloat16'.*'cpu'"):
        _core.plan_bytes(cfg, "cpu", T, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"got 'half'"):
        _core.plan_bytes(cfg, "cuda:0", T, dtype="half")

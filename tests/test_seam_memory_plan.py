"""memory_plan is arithmetic on the config: device="cuda" needs no GPU, no
driver (and no CUDA build); device_memory plans for a GPU one does not have
(fits, and the largest max_batch_tokens that fits); free/total bytes only where
the device exists. Model(device="cuda") still needs the device."""
from __future__ import annotations

import json
import shutil

import pytest

import rjepa_latent as rl
from rjepa_latent import _core
from rjepa_latent.checkpoints.checkpoint import engine_config, load_hf_config
from rjepa_latent.engine.model import CUDA_HEADROOM_BYTES

NO_CUDA = _core.cuda_device_count() == 0
GiB = 1024 ** 3


@pytest.fixture(scope="module")
def config_only(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("config_only")
    shutil.copy(tiny_model_dir("llama") / "config.json", d)  # no weights at all
    return d


def _bytes(d, t: int, dtype: str = "bfloat16") -> tuple[int, int]:
    public, _ = load_hf_config(d)
    return _core.plan_bytes(engine_config(public, public["num_layers"]), "cuda:0", t, dtype=dtype)


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_cuda_plan_without_a_device(config_only):
    plan = rl.memory_plan(config_only, device="cuda", max_batch_tokens=2048)
    weight, workspace = _bytes(config_only, 2048)
    assert plan["device"] == "cuda:0" and plan["dtype"] == "bfloat16"
    assert (plan["weight_bytes"], plan["workspace_bytes"]) == (weight, workspace)
    assert plan["total_bytes"] == weight + workspace
    assert "free_bytes" not in plan and "total_device_bytes" not in plan and "fits" not in plan
    f32 = rl.memory_plan(config_only, device="cuda:1", max_batch_tokens=2048, dtype="float32")
    assert f32["weight_bytes"] > plan["weight_bytes"] and f32["device"] == "cuda:1"
    default = rl.memory_plan(config_only, device="cuda")
    assert default["max_batch_tokens"] == 16384  # the CUDA default budget
    with pytest.raises(rl.DeviceError):  # a Model still needs the device
        rl.Model(config_only, device="cuda")


def test_device_memory_says_whether_it_fits_and_the_largest_budget(config_only):
    small = rl.memory_plan(config_only, device="cuda", max_batch_tokens=1024,
                           device_memory=1 * GiB)
    t = small["max_fitting_batch_tokens"]
    assert small["device_memory"] == GiB and small["headroom_bytes"] == CUDA_HEADROOM_BYTES
    assert small["fits"] and t > 1024
    fit = sum(_bytes(config_only, t)) + CUDA_HEADROOM_BYTES
    over = sum(_bytes(config_only, t + 1)) + CUDA_HEADROOM_BYTES
    assert fit <= GiB < over  # exactly the largest that fits
    at_limit = rl.memory_plan(config_only, device="cuda", max_batch_tokens=t, device_memory=GiB)
    past = rl.memory_plan(config_only, device="cuda", max_batch_tokens=t + 1, device_memory=GiB)
    assert at_limit["fits"] and not past["fits"]
    assert past["max_fitting_batch_tokens"] == t  # does not depend on the asked budget
    none = rl.memory_plan(config_only, device="cuda", device_memory=CUDA_HEADROOM_BYTES)
    assert not none["fits"] and none["max_fitting_batch_tokens"] == 0
    cpu = rl.memory_plan(config_only, device="cpu", max_batch_tokens=512, device_memory=GiB)
    assert cpu["headroom_bytes"] == 0 and cpu["fits"] and "free_bytes" not in cpu


@pytest.mark.parametrize("bad", [0, -5, 1.5, "8GB", True])
def test_bad_device_memory_is_named(config_only, bad):
    with pytest.raises(ValueError, match=r"device_memory must be a positive int \(bytes\)"):
        rl.memory_plan(config_only, device="cuda", device_memory=bad)


def test_bad_device_spelling_is_still_refused(config_only):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        rl.memory_plan(config_only, device="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA device")
def test_cuda_plan_with_a_device_reports_free_memory(config_only):
    plan = rl.memory_plan(config_only, device="cuda:0", max_batch_tokens=1024)
    assert 0 < plan["free_bytes"] <= plan["total_device_bytes"]
    assert plan["fits"] and plan["max_fitting_batch_tokens"] >= 1024
    json.dumps(plan)  # plain numbers


# ------------------------------------------------- quantized directories, config only

QWEN3_32B = {"hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
             "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 151936}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
       "version": "gemm", "modules_to_not_convert": None}


def _config_dir(d, base_dir, over: dict, quant: dict | None):
    d.mkdir()
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg.update(over)
    if quant is None:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = quant
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_qwen3_32b_awq_fits_a_24_gib_card_kept(tiny_model_dir, tmp_path):
    """A Qwen3-32B-shaped AWQ (4 bits, groups of 128) planned from its
    config.json alone (no 19 GB written): kept on CUDA it is its stored parts
    (qweight, qzeros, float16 scales), one bf16 scratch of the largest fused
    matrix (gate + up) and the dense rest, and fits a 24 GiB card with room
    for a workspace; dequantized to bf16 it needs more than two such cards."""
    d = _config_dir(tmp_path / "q32b", tiny_model_dir("qwen3"), QWEN3_32B, AWQ)
    h, ff, L = 5120, 25600, 64
    per_layer = [(8192, h), (1024, h), (1024, h), (h, 8192), (ff, h), (ff, h), (h, ff)]
    stored = L * sum(r * c // 2 + (c // 128) * r * 2 + (c // 128) * (r // 8) * 4
                     for r, c in per_layer)
    card = 24 * GiB
    plan = rl.memory_plan(d, device="cuda", max_batch_tokens=4096, device_memory=card)
    assert plan["weights"] == "keep" and plan["kept_bytes"] == stored
    embed = 151936 * h * 2
    scratch = 2 * ff * h * 2
    norms = (L * (2 * h + 2 * 128) + h) * 2
    assert plan["weight_bytes"] - stored - scratch - embed == pytest.approx(norms, rel=0.05)
    left = card - CUDA_HEADROOM_BYTES - plan["weight_bytes"]
    assert plan["fits"] and plan["workspace_bytes"] < left
    assert plan["max_fitting_batch_tokens"] > 4096
    print(f"Qwen3-32B AWQ kept: weights {plan['weight_bytes'] / GiB:.2f} GiB (stored "
          f"{stored / GiB:.2f} GiB), {left / GiB:.2f} GiB of a 24 GiB card left for the "
          f"workspace: up to {plan['max_fitting_batch_tokens']} tokens per batch")
    dense = rl.memory_plan(d, device="cuda", max_batch_tokens=4096, device_memory=card,
                           weights="dequantize")
    assert not dense["fits"] and dense["weight_bytes"] > 2 * card
    assert dense["max_fitting_batch_tokens"] == 0


@pytest.mark.parametrize("method,kw", [("awq", {}), ("awq", {"zero_point": False}),
                                       ("gptq", {"act_order": True}),
                                       ("gptq", {"bits": 8, "group_size": -1}),
                                       ("fp8", {"block": 32})])
def test_config_only_plan_equals_the_headers(tiny_model_dir, tmp_path, method, kw):
    """The arithmetic from quantization_config counts the bytes the files
    store (in the layout the quantization tools write)."""
    from rjepa_latent.testing import tiny_model
    from rjepa_latent.testing.quantize import quantize_hf
    src = tiny_model(tmp_path / "src", family="qwen3", hidden=128 if method == "fp8" else 64)
    qdir = quantize_hf(src, tmp_path / "q", method, **kw)
    only = tmp_path / "config_only"
    only.mkdir()
    shutil.copy(qdir / "config.json", only)
    for device in ("cpu", "cuda"):
        for weights in (None, "keep", "dequantize"):
            a = rl.memory_plan(qdir, device=device, max_batch_tokens=32, weights=weights)
            b = rl.memory_plan(only, device=device, max_batch_tokens=32, weights=weights)
            assert a == b
    assert a["weights"] == "dequantize"


def test_config_only_plan_refuses_unconverted_modules(tiny_model_dir, tmp_path):
    d = _config_dir(tmp_path / "q", tiny_model_dir("qwen3"), {},
                    {**AWQ, "modules_to_not_convert": ["model.layers.0.mlp"]})
    with pytest.raises(ValueError, match="modules_to_not_convert.*needs the safetensors headers"):
        rl.memory_plan(d, device="cuda")
    with_head = _config_dir(tmp_path / "h", tiny_model_dir("qwen3"), {},
                            {**AWQ, "modules_to_not_convert": ["lm_head"]})
    assert rl.memory_plan(with_head, device="cuda")["weights"] == "keep"

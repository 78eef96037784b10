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

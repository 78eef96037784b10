"""Messages for users: an engine error says what is wrong without the C
file:line that found it (that stays on the exception as `rjepa_where`, for bug
reports); the CUDA device messages tell no driver / driver too old / no device
/ not compiled in apart and say what to do; a normal CPU run prints no Python
warning, only a one-line notice on stderr when the device was left to the
default."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest

import rjepa_latent as rl
from rjepa_latent import _native  # noqa: F401  (loads _core and the BLAS it needs)
from rjepa_latent import _core
from rjepa_latent.engine import model as model_mod
from test_core_engine import GOOD, make_config, make_engine, make_weights

LOCATION = re.compile(r"\w+\.(c|cu|h):\d+")
WHERE = re.compile(r"(csrc|kernels)/\w+\.(c|cu):\d+")
NO_CUDA = _core.cuda_device_count() == 0


def _assert_clean(e: BaseException) -> None:
    msg = str(e)
    assert msg and not LOCATION.search(msg), msg
    assert WHERE.fullmatch(e.rjepa_where), e.rjepa_where


@pytest.fixture(scope="module")
def engine_parts():
    cfg = make_config()
    return cfg, make_weights(cfg, seed=1)


def test_engine_value_error_has_no_location(engine_parts):
    cfg, w = engine_parts
    eng = make_engine(cfg, w)
    with pytest.raises(ValueError, match="out of range") as e:
        eng.forward(*{**GOOD, "tokens": [1, 2, 3, 4, 97]}.values())
    _assert_clean(e.value)
    assert e.value.rjepa_where.startswith("csrc/engine.c:")


def test_engine_runtime_error_has_no_location(engine_parts):
    cfg, w = engine_parts
    eng = _core.Engine(cfg, "cpu", 1)
    with pytest.raises(RuntimeError, match="never set") as e:
        eng.check_complete()
    _assert_clean(e.value)
    with pytest.raises(ValueError, match="max_tokens must be") as e:
        eng.reserve(0)
    _assert_clean(e.value)


def test_config_error_has_no_location():
    with pytest.raises(ValueError) as e:
        _core.Engine(make_config(num_kv_heads=3), "cpu", 1)
    _assert_clean(e.value)


def test_each_error_has_its_own_location(engine_parts):
    """rjepa_where is the place of *this* error, not a stale one."""
    cfg, w = engine_parts
    eng = make_engine(cfg, w)
    with pytest.raises(ValueError) as a:
        eng.forward(*{**GOOD, "tokens": [1, 2, 3, 4, 97]}.values())
    with pytest.raises(RuntimeError) as b:
        _core.Engine(cfg, "cpu", 1).check_complete()
    assert a.value.rjepa_where != b.value.rjepa_where


def test_device_error_has_no_location_and_says_what_to_do():
    if not NO_CUDA:
        pytest.skip("a CUDA device is visible")
    with pytest.raises(rl.DeviceError) as e:
        _core.cuda_check_device(0)
    _assert_clean(e.value)
    msg = str(e.value)
    if not _core.build_info()["cuda"]:
        assert "not built in" in msg and "rebuild" in msg, msg
        return
    # CUDA compiled in on a machine without a usable GPU: which case it is
    assert re.search(r"no NVIDIA driver found|NVIDIA driver is too old|no CUDA device found|"
                     r"CUDA initialisation failed", msg), msg
    assert "device='cpu'" in msg, msg
    if "no NVIDIA driver found" in msg:
        assert "insufficient" not in msg.lower() and "install the NVIDIA driver" in msg, msg
    elif "too old" in msg:
        assert "update the NVIDIA driver" in msg, msg
    elif "no CUDA device found" in msg:
        assert "CUDA_VISIBLE_DEVICES" in msg, msg


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_model_device_error_has_no_location(tiny_model_dir):
    with pytest.raises(rl.DeviceError) as e:
        rl.Model(tiny_model_dir("llama"), device="cuda")
    _assert_clean(e.value)


def test_python_errors_have_no_where(tiny_model_dir):
    """rjepa_where is only on what the engine raised; a loader refusal is Python's."""
    with pytest.raises(ValueError) as e:
        rl.Model(tiny_model_dir("llama"), device="tpu")
    assert not hasattr(e.value, "rjepa_where")


# ---- the CPU notice -----------------------------------------------------------

@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_default_device_without_cuda_is_the_cpu_without_a_word(tiny_model_dir, capsys, monkeypatch):
    """The Python API: the default device falls back to the CPU silently
    (`Model.device` says it); no notice, no Python warning."""
    monkeypatch.setattr(model_mod, "_cpu_notice_shown", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert rl.Model(tiny_model_dir("llama")).device == "cpu"
        rl.Model(tiny_model_dir("llama"), device="cpu")
    assert caught == []
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_explicit_cpu_prints_nothing(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(model_mod, "_cpu_notice_shown", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rl.Model(tiny_model_dir("llama"), device="cpu")
    assert caught == [] and capsys.readouterr().err == ""


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_cli_extract_default_device_prints_no_python_warning(tiny_model_dir, tmp_path):
    """`rjepa-latent extract` with the default device, in a fresh process with
    every warning shown: stderr holds the one-line notice and no Warning."""
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "question": "How many?",
                                       "steps": ["She sold 48 / 2 = 24.", "48 + 24 = 72."]}) + "\n"
                           for i in range(3)))
    proc = subprocess.run([sys.executable, "-W", "always", "-m", "rjepa_latent.cli", "extract",
                           str(src), "--model", str(tiny_model_dir("llama")), "--no-progress",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               os.environ.get("PYTHONPATH", "")])))
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and ".py:" not in proc.stderr, proc.stderr
    # the default device's choice is shown once, in the summary, not as a notice on stderr
    assert proc.stderr == "" and proc.stdout.count(model_mod.CPU_NOTICE) == 1, proc.stdout
    assert rl.open_latents(tmp_path / "run").ids == ["0", "1", "2"]
    # an explicit --device cpu, and the commands that load no model, say nothing of devices
    again = [sys.executable, "-m", "rjepa_latent.cli", "extract", str(src), "--model",
             str(tiny_model_dir("llama")), "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run2")]
    for cmd in (again, [sys.executable, "-m", "rjepa_latent.cli", "info", str(tmp_path / "run")],
                [sys.executable, "-m", "rjepa_latent.cli", "verify", str(tmp_path / "run")],
                [sys.executable, "-m", "rjepa_latent.cli", "export", str(tmp_path / "run"), "--format",
                 "npy", "--out", str(tmp_path / "npy")]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(
            os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    os.environ.get("PYTHONPATH", "")])))
        assert p.returncode == 0, p.stderr
        assert "CUDA" not in p.stdout + p.stderr and "device" not in p.stdout + p.stderr, (cmd[3], p.stdout)

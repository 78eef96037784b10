"""The pytest plugin of rjepa_latent (entry point `pytest11`), active in every
pytest run where the package is installed; `-p no:rjepa_latent` turns it off.

It adds only what is named `rjepa_*`, so a suite that does not use it is
untouched: nothing is built or loaded until a test asks for a fixture, and
loading it imports only pytest and the rjepa_latent package itself (never
torch or transformers).

Fixtures (session-scoped, built once, in pytest's temporary directory):
  rjepa_tiny_model  Path of a tiny random qwen3 HF checkpoint (`tiny_model`)
  rjepa_model       a CPU `rjepa_latent.Model` of it (or of --rjepa-model),
                    closed at the end of the session
  rjepa_run         Path of a real extraction of 24 `sample_records` with
                    rjepa_model (layer -2, mean pooling)
  rjepa_fake_run    Path of a `fake_run` (100 records, random latents)
  rjepa_device      (per test) "cuda:0" where a test marked rjepa_gpu runs on a
                    device, else "cpu"
Marker `rjepa_gpu`: the test runs where rjepa_latent sees a CUDA device (a real
GPU, or the emulated device of a build that provides one) and is skipped,
with the reason, everywhere else.
Option `--rjepa-model PATH`: rjepa_model and rjepa_run use that checkpoint (an
HF directory or a .gguf file) instead of the tiny model.
"""
from __future__ import annotations

import os

import pytest

RUN_RECORDS = 24
FAKE_RUN_RECORDS = 100


def pytest_addoption(parser):
    parser.getgroup("rjepa_latent").addoption(
        "--rjepa-model", metavar="PATH", default=None,
        help="checkpoint (HF directory or .gguf file) for the rjepa_model and rjepa_run "
             "fixtures instead of the tiny random model")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "rjepa_gpu: runs on a CUDA device that rjepa_latent sees (or its emulated "
                   "device), skipped cleanly where there is none")
    path = config.getoption("rjepa_model", None)
    if path is not None and not os.path.exists(path):
        raise pytest.UsageError(f"--rjepa-model {path}: no such file or directory (give an HF "
                                "checkpoint directory or a .gguf file)")


def gpu_unavailable() -> str | None:
    """None when rjepa_latent can run on a CUDA device here, else why not."""
    try:
        from rjepa_latent import build_info
        from rjepa_latent._native import _core
    except ImportError as e:
        return f"rjepa_latent cannot be imported ({e})"
    info = build_info()
    if not info.get("cuda"):   # true in the emulated build too
        return "rjepa_latent was built without CUDA (build_info()['cuda'] is False)"
    if _core.cuda_device_count() <= 0:
        return "no CUDA device visible to rjepa_latent"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("rjepa_gpu") is not None:
        reason = gpu_unavailable()
        if reason is not None:
            pytest.skip(f"rjepa_gpu: {reason}")


@pytest.fixture(scope="session")
def rjepa_tiny_model(tmp_path_factory):
    """Path of a tiny random qwen3 checkpoint (HF directory), built once."""
    from rjepa_latent.testing import tiny_model
    return tiny_model(tmp_path_factory.mktemp("rjepa_tiny_model"), family="qwen3")


def _model_path(request):
    path = request.config.getoption("rjepa_model", None)
    return path if path is not None else request.getfixturevalue("rjepa_tiny_model")


@pytest.fixture(scope="session")
def rjepa_model(request):
    """A CPU `rjepa_latent.Model` of the tiny model (or --rjepa-model), shared
    by the session and closed at its end; do not close it in a test."""
    from rjepa_latent import Model
    model = Model(_model_path(request), device="cpu")
    yield model
    model.close()


@pytest.fixture(scope="session")
def rjepa_run(rjepa_model, tmp_path_factory):
    """Path of a finished run: a real extraction of `sample_records(24)` (cot,
    gsm8k and text records) with rjepa_model, layer -2, mean pooling."""
    from rjepa_latent import extract_dataset
    from rjepa_latent.testing import sample_records, write_records
    root = tmp_path_factory.mktemp("rjepa_run")
    data = write_records(root / "records.jsonl", sample_records(RUN_RECORDS))
    extract_dataset(data, rjepa_model, root / "run", layers=(-2,), pooling="mean",
                    shard_size=10, progress=False, strict=True)
    return root / "run"


@pytest.fixture(scope="session")
def rjepa_fake_run(tmp_path_factory):
    """Path of a finished fake run (100 records, layer -2, mean pooling, hidden 64)."""
    from rjepa_latent.testing import fake_run
    return fake_run(tmp_path_factory.mktemp("rjepa_fake_run") / "run", records=FAKE_RUN_RECORDS)


@pytest.fixture
def rjepa_device(request):
    """"cuda:0" for a test marked rjepa_gpu (it only runs where there is one), else "cpu"."""
    return "cuda:0" if request.node.get_closest_marker("rjepa_gpu") is not None else "cpu"

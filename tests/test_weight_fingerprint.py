"""The model fingerprint covers the weights' bytes: two checkpoints of the same
architecture whose weights differ (HF directory and GGUF file) have different
fingerprints though their configs and tensor headers agree, and a run started
with one is refused when resumed or run again with the other, the message
naming the fingerprint."""
from __future__ import annotations

import shutil

import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.loader import open_checkpoint
from rjepa_latent.errors import StoreError
from rjepa_latent.testing import sample_records, tiny_model, write_records

from conftest import interrupt_at_shard

SHARD = 2


@pytest.fixture(params=["hf", "gguf"])
def checkpoints(request, tmp_path):
    suffix = "" if request.param == "hf" else ".gguf"
    a = tiny_model(tmp_path / f"a{suffix}", family="llama", format=request.param, seed=0)
    b = tiny_model(tmp_path / f"b{suffix}", family="llama", format=request.param, seed=1)
    return a, b


def test_same_architecture_other_weights_other_fingerprint(checkpoints, tmp_path):
    a, b = checkpoints
    fa, fb = (rl.Model(p, device="cpu").fingerprint for p in (a, b))
    assert fa != fb
    assert rl.Model(a, device="cpu").fingerprint == fa           # the same bytes: the same fingerprint
    assert rl.Model(a, device="cpu", max_layer=1).fingerprint == fa   # whatever layers are loaded
    if a.is_dir():   # what the header alone covers (config, names, dtypes, shapes) is the same
        sa, sb = open_checkpoint(a), open_checkpoint(b)
        try:
            assert sa.fingerprint == sb.fingerprint
        finally:
            sa.close()
            sb.close()
    copy = tmp_path / ("copy" + a.suffix)
    (shutil.copytree if a.is_dir() else shutil.copyfile)(a, copy)
    assert rl.Model(copy, device="cpu").fingerprint == fa       # it names bytes, not paths


def test_resume_with_other_weights_is_refused(checkpoints, tmp_path, monkeypatch):
    a, b = checkpoints
    data = write_records(tmp_path / "d.jsonl", sample_records(6))
    out = tmp_path / "run"
    compute = interrupt_at_shard(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        rl.extract_dataset(data, a, out, shard_size=SHARD, progress=False, device="cpu")
    monkeypatch.setattr("rjepa_latent.run.local._Runner._compute", compute)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(StoreError, match=r"(?s)different configuration.*model_fingerprint: stored"):
        rl.extract_dataset(data, b, out, shard_size=SHARD, progress=False, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == before       # nothing changed
    s = rl.extract_dataset(data, a, out, shard_size=SHARD, progress=False, device="cpu")
    assert s["complete"]                                          # the run's own weights resume it
    with pytest.raises(StoreError, match=r"model_fingerprint: stored"):
        rl.extract_dataset(data, b, out, shard_size=SHARD, progress=False, device="cpu")

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


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.parametrize("kind", ["mmap", "np.memmap"])
def test_hashing_a_file_map_leaves_its_pages_out_of_resident_memory(tmp_path, kind):
    """The loader drops a tensor's mapped pages once copied; hashing them
    (in background threads, maybe later) must not bring them back for the
    rest of the load: at 8B that was gigabytes of the peak RSS."""
    import hashlib
    import mmap

    import numpy as np

    from rjepa_latent.checkpoints.weight_hash import WeightHasher
    data = np.random.default_rng(0).integers(0, 256, 160 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    if kind == "mmap":     # the HF loader's maps
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    else:                  # gguf-py's reader
        mm = np.memmap(path, mode="r")
    try:
        before = _rss_file()
        h = WeightHasher("header", ["w"])
        h.add("w", mm, 4096, len(mm))
        got = h.fingerprint(lambda name: None)
        grew = _rss_file() - before
    finally:
        getattr(mm, "_mmap", mm).close()
    ref = WeightHasher("header", ["w"])
    ref.add("w", data[4096:])
    assert got == ref.fingerprint(lambda name: None)
    want = hashlib.sha256(data[4096:]).hexdigest()
    assert hashlib.sha256(f"weights-sha256:header\nw:{want}".encode()).hexdigest() == got
    assert grew < 32 << 20, grew     # at most the slices in flight, not the 160 MB read

"""Run directory without a model: safetensors files readable by the
`safetensors` library, bf16 rounding equal to torch's, float16 overflow
refused, zero-copy reads, partial runs, refusal of clashing directories."""
import json
import mmap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rjepa_latent import StoreError, open_latents
from rjepa_latent.store.write import RunStore
from rjepa_latent.store.files import atomic_write, bf16_from_f32, convert_latents, f32_from_bf16, read_safetensors, safetensors_chunks

CONFIG = {"model_fingerprint": "abc", "layers": [1, 2], "hidden_size": 8, "dtype": "float32",
          "pooling": "mean", "shard_size": 3}


def base_object(a):
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.obj if isinstance(a, memoryview) else a.base
    return a


def test_safetensors_roundtrip_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 5, 8)).astype(np.float32)
    tensors = [("step_offsets", "I64", np.array([0, 2, 5], np.int64)),
               ("token_spans", "I32", rng.integers(0, 9, (5, 2)).astype(np.int32)),
               ("latents", "BF16", bf16_from_f32(lat)), ("half", "F16", lat.astype(np.float16)),
               ("empty", "F32", np.zeros((2, 0, 8), np.float32))]
    info = atomic_write(tmp_path / "a.safetensors", safetensors_chunks(tensors), "0-1")
    assert info["bytes"] == (tmp_path / "a.safetensors").stat().st_size
    mine = read_safetensors(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        for name, _, arr in tensors:
            ref = f.get_tensor(name)
            if name == "latents":
                assert ref.dtype == torch.bfloat16
                assert torch.equal(ref, torch.from_numpy(lat).to(torch.bfloat16))  # same rounding as torch
                ref = ref.view(torch.int16)
            assert np.array_equal(ref.numpy().view(arr.dtype), arr) and np.array_equal(mine[name], arr)
    assert isinstance(base_object(mine["latents"]), mmap.mmap)  # a view of the mapped file
    assert not mine["latents"].flags.writeable
    assert np.array_equal(f32_from_bf16(mine["latents"]), torch.from_numpy(lat).to(torch.bfloat16).float().numpy())


def test_convert_latents_refuses_overflow_and_nonfinite():
    x = np.ones((1, 2, 4), np.float32)
    assert convert_latents(x, "float16")[0].dtype == np.float16
    x[0, 1, 2] = 70000.0
    lat, reason = convert_latents(x, "float16")
    assert lat is None and "overflow float16" in reason and "7e+04" in reason
    assert convert_latents(x, "bfloat16")[1] is None and convert_latents(x, "float32")[1] is None
    x[0, 0, 0] = np.nan
    assert "NaN" in convert_latents(x, "float32")[1]


def fake_items(n, start, steps=2):
    return [SimpleNamespace(id=f"r{start + i}", ids=np.arange(5, dtype=np.int32), text=f"t{i}", source="f.jsonl",
                            line=start + i + 1, meta={"k": i}, spans=np.array([[1, 3], [3, 5]][:steps], np.int32))
            for i in range(n)]


def test_partial_run_reader_and_errors(tmp_path):
    out = tmp_path / "run"
    st = RunStore(out, CONFIG)
    st.prepare(8)  # 3 shards of 3 records
    items = fake_items(2, 0)
    lats = [np.full((2, 2, 8), i, np.float32) for i in range(2)]
    err = {"id": "r2", "source": "f.jsonl", "line": 3, "reason": "bad"}
    st.write_shard(0, (0, 3), items, lats, [err])
    s = open_latents(out)
    assert not s.complete and len(s) == 2 and s.ids == ["r0", "r1"] and s.errors == [err]
    assert not (out / "errors.jsonl").exists()   # derived when the run finishes; readers use the journal
    it = s["r1"]
    assert it.latents.shape == (2, 2, 8) and (it.latents == 1).all() and it.meta["k"] == 1
    assert isinstance(base_object(it.latents), mmap.mmap)
    assert it.token_spans.tolist() == [[1, 3], [3, 5]] and s[-1].id == "r1"
    with pytest.raises(KeyError):
        s["nope"]
    with pytest.raises(IndexError):
        s[2]
    st.write_shard(2, (6, 8), [], [], [])  # a shard may hold no item
    st.write_shard(1, (3, 6), fake_items(1, 3, steps=1), [np.zeros((2, 1, 8), np.float32)], [])
    assert not open_latents(out).complete                 # every shard committed, not finished yet
    assert st.finish(8) and st.finish(8)                  # idempotent
    s = open_latents(out)
    assert s.complete and s.ids == ["r0", "r1", "r3"] and s[2].latents.shape == (2, 1, 8)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()] == [err]


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_clashing_config_and_foreign_files_are_refused_untouched(tmp_path):
    out = tmp_path / "run"
    st = RunStore(out, CONFIG)
    st.prepare(3)
    before = snapshot(out)
    with pytest.raises(StoreError) as e:
        RunStore(out, {**CONFIG, "dtype": "float16", "layers": [2]})
    msg = str(e.value)
    assert "dtype: stored 'float32', requested 'float16'" in msg and "layers: stored [1, 2]" in msg
    assert "pooling" not in msg
    assert snapshot(out) == before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes.txt"):
        RunStore(out, CONFIG)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        RunStore(tmp_path / "file", CONFIG)
    with pytest.raises(StoreError, match="no manifest"):
        open_latents(tmp_path)


def test_reader_keeps_a_bounded_number_of_shard_files_open(tmp_path):
    import os
    from rjepa_latent.store.files import MAX_OPEN_SHARDS
    n = 3 * MAX_OPEN_SHARDS
    st = RunStore(tmp_path / "run", {**CONFIG, "shard_size": 1})
    st.prepare(n)
    for k in range(n):
        st.write_shard(k, (k, k + 1), fake_items(1, k), [np.full((2, 2, 8), k, np.float32)], [])
    s = open_latents(tmp_path / "run")
    fds = len(os.listdir("/proc/self/fd"))
    first = s[0].latents  # a view outlives its shard's eviction from the cache
    assert [float(it.latents.mean()) for it in s] == list(range(n))
    assert len(os.listdir("/proc/self/fd")) <= fds + MAX_OPEN_SHARDS + 1  # one mmap (fd) per cached shard
    assert (first == 0).all() and float(s[0].latents.mean()) == 0.0


def test_reader_keeps_line_separators_inside_texts(tmp_path):
    # json.dumps leaves U+2028/U+2029/U+0085 unescaped; str.splitlines() split rows at them
    st = RunStore(tmp_path / "run", CONFIG)
    st.prepare(2)
    items = fake_items(2, 0)
    items[0].text = "a\u2028b\u2029c\x85d\x1ce"
    st.write_shard(0, (0, 2), items, [np.zeros((2, 2, 8), np.float32)] * 2, [])
    s = open_latents(tmp_path / "run")
    assert s.ids == ["r0", "r1"] and s["r0"].meta["text"] == "a\u2028b\u2029c\x85d\x1ce"


def test_two_runs_cannot_write_one_directory_at_once(tmp_path):
    """A single run locks its directory; a second single run (or a --part worker)
    is refused instead of deleting the first one's temporary files."""
    from rjepa_latent.errors import StoreError
    from rjepa_latent.store.write import RunStore
    cfg = {"shard_size": 2}
    first = RunStore(tmp_path / "run", cfg)
    first.prepare(4)
    with pytest.raises(StoreError, match="in use by another rjepa-latent run"):
        RunStore(tmp_path / "run", cfg).prepare(4)
    with pytest.raises(StoreError, match="in use"):
        RunStore(tmp_path / "run", cfg, (0, 2)).prepare(4)
    first.close()
    again = RunStore(tmp_path / "run", cfg)
    again.prepare(4)   # free once the first run is done
    again.close()
    a, b = RunStore(tmp_path / "parts", cfg, (0, 2)), RunStore(tmp_path / "parts", cfg, (1, 2))
    a.prepare(4)
    b.prepare(4)       # --part workers share a directory
    a.close()
    b.close()


def _edit(path, old, new):
    b = path.read_bytes()
    assert b.count(old) == 1 and len(old) == len(new)
    path.write_bytes(b.replace(old, new))


@pytest.mark.parametrize("pooling,edit", [
    ("mean", (b'"step_offsets":{"dtype":"I64"', b'"step_offsets":{"dtype":"F64"')),     # unknown dtype
    ("none", (b'"token_steps":{"dtype":"I32"', b'"token_steps":{"dtype":"F32"')),     # per-token tensor
    (["mean", "max"], (b'"poolings":"mean,max"', b'"poolings":"max,mean"')),        # pooling order
    (["mean", "max"], (b'"latents.max"', b'"latents.min"')),                          # a tensor renamed
])
def test_header_edits_are_refused_naming_the_shard(tmp_path, pooling, edit):
    out = tmp_path / "run"
    st = RunStore(out, {**CONFIG, "pooling": pooling})
    st.prepare(3)
    n_pool = 1 if isinstance(pooling, str) else len(pooling)
    rows = 5 if pooling == "none" else 2
    st.write_shard(0, (0, 3), fake_items(1, 0), [np.zeros((n_pool, 2, rows, 8), np.float32)], [])
    st.close()
    assert open_latents(out)[0].latents.shape == (2, rows, 8)
    _edit(out / "shard-00000.safetensors", *edit)
    s = open_latents(out)          # the sidecar is sound: opening works
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: .*--repair"):
        s[0]
    from rjepa_latent.store.files import verify_run
    assert list(verify_run(out, full=False)) == ["shard-00000.safetensors"]


def test_sidecar_damage_is_a_store_error_naming_the_file(tmp_path):
    out = tmp_path / "run"
    st = RunStore(out, CONFIG)
    st.prepare(3)
    st.write_shard(0, (0, 3), fake_items(2, 0), [np.zeros((2, 2, 8), np.float32)] * 2, [])
    st.close()
    _edit(out / "shard-00000.jsonl", b'{"id": "r0"', b'{"id": "r0 ')   # same size, not JSON any more
    with pytest.raises(StoreError, match=r"shard-00000\.jsonl: size or sha256 differs.*--repair"):
        open_latents(out)


def test_verify_shows_progress_on_large_runs(tmp_path, monkeypatch, capsys):
    from rjepa_latent.store import files as rl_files
    out = tmp_path / "run"
    st = RunStore(out, CONFIG)
    st.prepare(3)
    st.write_shard(0, (0, 3), fake_items(2, 0), [np.zeros((2, 2, 8), np.float32)] * 2, [])
    st.close()
    assert rl_files.verify_run(out, progress=True) == {} and "hashed" not in capsys.readouterr().err
    monkeypatch.setattr(rl_files, "VERIFY_PROGRESS_BYTES", 10)
    assert rl_files.verify_run(out, progress=True) == {}
    assert "GiB hashed" in capsys.readouterr().err

"""Readers for training: torch datasets, HF datasets, Parquet, flat npy —
each must return exactly the numbers `open_latents` returns."""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.store import read as rl_read
from rjepa_latent.testing import fake_run

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")

from rjepa_latent.torch import LatentDataset, StepPairs, collate_steps  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs of 10 records (1 to 4 steps each), layers [-2, -1, 1] of 3, 3 records per
    shard, in each stored dtype: the readers must return what open_latents returns, so
    random latents written by the store itself (fake_run) serve as well as a model's."""
    tmp = tmp_path_factory.mktemp("readers")
    return {dtype: fake_run(tmp / f"run-{dtype}", records=10, layers=[-2, -1, 1], num_layers=3,
                            steps=(1, 4), dtype=dtype, shard_size=3)
            for dtype in ("float32", "bfloat16", "float16")}


def _reference(run, layer_pos):
    st = rl.open_latents(run)
    return [(it.id, np.asarray(it.latents[layer_pos]).astype(np.float32), dict(it.meta)) for it in st]


def test_latent_dataset_equals_open_latents_without_copy_or_warning(runs):
    run = runs["float32"]
    ref = _reference(run, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no read-only (or any) warning
        ds = LatentDataset(run, layer=-2)
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) == len(ref) == 10
    for it, (rid, lat, meta) in zip(items, ref):
        assert it["id"] == rid and it["num_steps"] == lat.shape[0] == meta["num_steps"]
        assert it["difficulty"] == meta["difficulty"]
        assert isinstance(it["latents"], torch.Tensor) and it["latents"].dtype == torch.float32
        np.testing.assert_array_equal(it["latents"].numpy(), lat)
    # zero-copy over a private mapping: writing the tensor never reaches the file
    items[0]["latents"].add_(1.0)
    np.testing.assert_array_equal(rl.open_latents(run)[0].latents[0], ref[0][1])
    assert LatentDataset(run, layer=-1)[3]["latents"].shape[0] == ref[3][1].shape[0]


def test_collate_pads_and_masks(runs):
    ds = LatentDataset(runs["float32"], layer=1)
    batch = collate_steps([ds[i] for i in range(4)])
    n = [ds[i]["num_steps"] for i in range(4)]
    assert batch["latents"].shape == (4, max(n), 64) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == n and batch["num_steps"].tolist() == n
    assert batch["id"] == rl.open_latents(runs["float32"]).ids[:4]
    assert (batch["latents"][~batch["mask"]] == 0).all()
    np.testing.assert_array_equal(batch["latents"][2, :n[2]].numpy(), ds[2]["latents"].numpy())


def test_dataloader_with_workers(runs):
    ds = LatentDataset(runs["float32"], layer=-2)
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_steps)
    seen = [i for b in dl for i in b["id"]]
    assert seen == rl.open_latents(runs["float32"]).ids
    pairs = torch.utils.data.DataLoader(StepPairs(runs["float32"]), batch_size=4, num_workers=2)
    assert sum(len(b["id"]) for b in pairs) == len(StepPairs(runs["float32"]))


def test_a_plain_dataloader_batches_records_of_different_lengths(runs):
    """`DataLoader(LatentDataset(run), batch_size=8)` as a user first writes it
    (no collate_fn): the batches are collate_steps's, padded with a mask; and
    `.loader()` gives the same, with workers too."""
    ds = LatentDataset(runs["float32"], layer=-2)
    n = [ds[i]["num_steps"] for i in range(len(ds))]
    assert len(set(n[:8])) > 1   # the records differ in length: torch.stack alone would fail
    plain = list(torch.utils.data.DataLoader(ds, batch_size=8))
    assert [b["latents"].shape[0] for b in plain] == [8, 2]
    assert plain[0]["latents"].shape == (8, max(n[:8]), 64)
    assert plain[0]["mask"].sum(1).tolist() == n[:8] and plain[0]["id"] == [ds[i]["id"] for i in range(8)]
    helper = list(ds.loader(batch_size=8, num_workers=2))
    for a, b in zip(plain, helper):
        assert a["id"] == b["id"] and torch.equal(a["latents"], b["latents"])
        assert torch.equal(a["mask"], b["mask"])


def test_step_pairs(runs):
    ref = _reference(runs["float32"], 0)
    for offset in (1, 2):
        sp = StepPairs(runs["float32"], layer=-2, offset=offset)
        want = [(rid, t) for rid, lat, _ in ref for t in range(max(lat.shape[0] - offset, 0))]
        assert len(sp) == len(want)
        for i, (rid, t) in enumerate(want):
            p = sp[i]
            lat = next(l for r, l, _ in ref if r == rid)
            assert (p["id"], p["step"]) == (rid, t)
            np.testing.assert_array_equal(p["z_t"].numpy(), lat[t])
            np.testing.assert_array_equal(p["z_next"].numpy(), lat[t + offset])
    with pytest.raises(IndexError):
        sp[len(sp)]
    with pytest.raises(ValueError, match="offset"):
        StepPairs(runs["float32"], offset=0)


def test_bf16_runs_give_bf16_tensors_and_ml_dtypes(runs):
    run = runs["bfloat16"]
    ref = _reference(run, 0)     # open_latents gives float32 copies of the bf16 values
    ds = LatentDataset(run, layer=-2)
    assert ds[0]["latents"].dtype == torch.bfloat16
    np.testing.assert_array_equal(ds[5]["latents"].float().numpy(), ref[5][1])
    item = rl.open_latents(run)[5]
    import ml_dtypes
    assert item.latents.dtype == ml_dtypes.bfloat16 and np.shares_memory(item.latents, item.raw_latents)
    raw = item.raw_latents[0]
    np.testing.assert_array_equal(rl_read.bf16_view(raw).astype(np.float32), ref[5][1])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hf_dataset_equals_open_latents(runs, dtype):
    ref = _reference(runs[dtype], 0)
    ds = rl.open_latents(runs[dtype]).to_hf_dataset(layer=-2).with_format("numpy")
    assert len(ds) == 10 and set(ds.column_names) >= {"id", "latents", "num_steps", "num_tokens",
                                                      "source", "difficulty"}
    for row, (rid, lat, meta) in zip(ds, ref):
        assert row["id"] == rid and int(row["num_steps"]) == lat.shape[0]
        np.testing.assert_array_equal(np.asarray(row["latents"], np.float32), lat)


def test_parquet_export_reads_back_everywhere(runs, tmp_path):
    import pyarrow.parquet as pq
    from rjepa_latent.cli import main
    ref = _reference(runs["float32"], 2)          # stored layers [2, 3, 1]: position 2 is layer 1
    out = tmp_path / "l1.parquet"
    assert main(["export", str(runs["float32"]), "--format", "parquet", "--out", str(out),
                 "--layer", "1", "--row-group-rows", "4"]) == 0
    f = pq.ParquetFile(out)
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == 10
    t = pq.read_table(out)
    flat = t.column("latents").combine_chunks().values.values.to_numpy(zero_copy_only=True)
    np.testing.assert_array_equal(flat, np.concatenate([l.reshape(-1) for _, l, _ in ref]))
    df = t.to_pandas()
    assert list(df["id"]) == [r for r, _, _ in ref]
    hf = datasets.Dataset.from_parquet(str(out)).with_format("numpy")
    for row, (rid, lat, _) in zip(hf, ref):
        np.testing.assert_array_equal(np.asarray(row["latents"], np.float32), lat)
    assert json.loads(t.schema.metadata[b"rjepa_latent"])["layer"] == 1


def test_parquet_export_names_the_layer_as_the_default_does(runs, tmp_path, capsys):
    """--layer -1 on a 3-layer model is hidden-state index 3: the line says 3
    (as the default's line says the stored index), with what was given."""
    from rjepa_latent.cli import main
    assert main(["export", str(runs["float32"]), "--format", "parquet", "--out",
                 str(tmp_path / "a.parquet"), "--layer", "-1"]) == 0
    assert "(layer 3 = --layer -1, pooling mean)" in capsys.readouterr().out
    assert main(["export", str(runs["float32"]), "--format", "parquet", "--out",
                 str(tmp_path / "b.parquet")]) == 0
    assert "(layer 2, pooling mean)" in capsys.readouterr().out


def test_npy_export(runs, tmp_path):
    from rjepa_latent.cli import main
    out = tmp_path / "npy"
    assert main(["export", str(runs["float32"]), "--format", "npy", "--out", str(out)]) == 0
    offsets = np.load(out / "step_offsets.npy")
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for pos, layer in enumerate([2, 3, 1]):
        flat = np.load(out / f"latents.layer-{layer}.npy", mmap_mode="r")
        ref = _reference(runs["float32"], pos)
        assert flat.shape == (offsets[-1], 64) and len(items) == len(ref) == len(offsets) - 1
        for k, (rid, lat, _) in enumerate(ref):
            assert items[k]["id"] == rid
            np.testing.assert_array_equal(flat[offsets[k]:offsets[k + 1]], lat)


def test_reader_errors(runs, tmp_path, monkeypatch, capsys):
    from rjepa_latent.cli import main
    with pytest.raises(ValueError, match=r"stores layers \[2, 3, 1\]"):
        LatentDataset(runs["float32"], layer=0)
    with pytest.raises(ValueError, match="pooling 'max' is not in this run"):
        LatentDataset(runs["float32"], pooling="max")
    assert main(["export", str(runs["float32"]), "--format", "parquet", "--out",
                 str(tmp_path / "x.parquet"), "--layer", "0"]) == 2
    assert "not in this run" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--format", "npy", "--out", str(tmp_path / "y")]) == 2
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install .pyarrow>=14."):
        rl_read.arrow_table(rl.open_latents(runs["float32"]))


def test_in_place_changes_never_reach_later_items(runs):
    """Training code normalises tensors in place: the next epoch must see the stored values."""
    ds = LatentDataset(runs["float32"], layer=-2)
    ref = ds[0]["latents"].clone()
    ds[0]["latents"].zero_()
    assert torch.equal(ds[0]["latents"], ref)
    sp = StepPairs(runs["float32"])
    first = sp[0]["z_next"].clone()
    sp[0]["z_next"].mul_(0)
    assert torch.equal(sp[0]["z_next"], first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ds[0]["latents"].numpy(), rl.open_latents(runs["float32"])[0].latents[0])


def test_export_refuses_partial_runs_and_is_atomic(runs, tmp_path, capsys):
    import shutil
    from rjepa_latent.cli import main
    partial = tmp_path / "partial"
    shutil.copytree(runs["float32"], partial)
    m = json.loads((partial / "manifest.json").read_text())
    m["shards"] = m["shards"][:2]                     # as if interrupted after two shards
    m["complete"] = False
    m.pop("manifest_sha256")   # as a writer of format 2 without the content hash left it
    (partial / "manifest.json").write_text(json.dumps(m))
    assert not rl.open_latents(partial).complete
    out = tmp_path / "p.parquet"
    assert main(["export", str(partial), "--format", "parquet", "--out", str(out)]) == 2
    assert "not complete" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(partial), "--format", "parquet", "--out", str(out), "--partial"]) == 0
    assert "partial run" in capsys.readouterr().out
    # npy: a bad layer leaves nothing behind, an existing non-empty directory is refused
    npy = tmp_path / "npy"
    assert main(["export", str(runs["float32"]), "--format", "npy", "--out", str(npy), "--layer", "0"]) == 2
    assert not npy.exists() and not list(tmp_path.glob(".npy.tmp-*"))
    npy.mkdir()
    (npy / "old.npy").write_bytes(b"x")
    assert main(["export", str(runs["float32"]), "--format", "npy", "--out", str(npy)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_kept_items_hold_no_file_descriptors(runs):
    """A DataLoader (or a list(ds)) keeping thousands of items must not keep a file open per item."""
    import os
    ds = LatentDataset(runs["float32"], layer=-2)
    before = len(os.listdir("/proc/self/fd"))
    kept = [ds[i % len(ds)] for i in range(3000)]
    assert len(os.listdir("/proc/self/fd")) - before <= 8     # the shards' maps, not one per item
    assert len(kept) == 3000


def test_partial_export_reads_the_journal(runs, tmp_path, capsys):
    """A partial run of format 2 lists its shards in the journal (manifest.json holds
    only the configuration until the end): --partial export reads them from there."""
    import shutil
    from rjepa_latent.cli import main
    partial = tmp_path / "partial"
    shutil.copytree(runs["float32"], partial)
    m = json.loads((partial / "manifest.json").read_text())
    start = {k: m[k] for k in ("format", "format_version", "config")} | {"complete": False}
    (partial / "manifest.json").write_text(json.dumps(start))   # as if interrupted after two shards
    for p in sorted(partial.glob("shard-*.json"))[2:]:
        p.unlink()
    st = rl.open_latents(partial)
    assert not st.complete and len(st.shards) == 2 and 0 < len(st) < len(rl.open_latents(runs["float32"]))
    out = tmp_path / "p.parquet"
    assert main(["export", str(partial), "--format", "parquet", "--out", str(out), "--partial"]) == 0
    import pyarrow.parquet as pq
    assert pq.read_table(out).column("id").to_pylist() == st.ids


def test_torch_datasets_open_the_run_once(runs, monkeypatch):
    from rjepa_latent.integrations import torch as rl_torch
    calls = []
    real = rl_torch.open_latents
    monkeypatch.setattr(rl_torch, "open_latents", lambda *a, **k: calls.append(a) or real(*a, **k))
    ds = LatentDataset(runs["float32"], layer=-2)
    ds[0], len(ds), ds[len(ds) - 1]
    pairs = StepPairs(runs["float32"], layer=-2)
    pairs[0]
    assert len(calls) == 2    # one open per dataset (a worker process opens its own after pickling)

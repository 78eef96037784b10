"""Run directories of several poolings and of per-token output: what a shard
holds and says it holds, `.latents` (the first pooling, zero-copy) and
`.pooled(name)`, per-token `.latents` / `.token_steps` against HF's hidden
states, the disk check of a per-token run (refusal monkeypatched), run
identity, resume byte-identity after kills, old single-pooling runs, the
CLI, and the readers (`pooling=`, per-token rows)."""
from __future__ import annotations

import json
import os
import shutil
import signal
from types import SimpleNamespace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.store import export as rl_export
from rjepa_latent.store import read as rl_read
from rjepa_latent.cli import main as cli_main
from rjepa_latent.errors import StoreError
from rjepa_latent.store.files import atomic_write, read_safetensors, safetensors_chunks
from test_tokenize import ADVERSARIAL

TOL = 1e-5
MULTI = ("mean", "max", "last")


def _records(n=12):
    out = list(ADVERSARIAL)
    for i in range(n):
        steps = [f"Step {k}: {i} + {k} = {i + k} apples." for k in range(1 + i % 4)]
        out.append({"id": f"r{i}", "question": f"Question {i}: how many?", "steps": steps,
                    "difficulty": i % 3})
    return out


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cpu")
    yield m
    m.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("pool_data") / "d.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records()),
                 encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def runs(model, data, tmp_path_factory):
    """A run of three poolings, runs of each alone, a per-token run (f32 and bf16)."""
    tmp = tmp_path_factory.mktemp("pool_runs")
    out = {}
    for name, pooling, dtype in (("multi", MULTI, "float32"), ("mean", "mean", "float32"),
                                 ("max", "max", "float32"), ("last", "last", "float32"),
                                 ("none", "none", "float32"), ("none_bf16", "none", "bfloat16")):
        out[name] = tmp / name
        rl.extract_dataset(data, model, out[name], layers=(1, -1), pooling=pooling, dtype=dtype,
                           shard_size=5, max_batch_tokens=300, progress=False)
    return out


def test_multi_pooling_run_layout(runs):
    store = rl.open_latents(runs["multi"])
    assert store.poolings == list(MULTI) and store.config["pooling"] == list(MULTI)
    assert not store.per_token and store.complete and len(store) == len(_records())
    for s in store.shards:
        h = header(runs["multi"] / f"shard-{s['index']:05d}.safetensors")
        assert h["__metadata__"]["poolings"] == "mean,max,last"
        assert [k for k in h if k != "__metadata__"] == [
            "step_offsets", "token_spans", "latents", "latents.max", "latents.last"]
        for k in ("latents", "latents.max", "latents.last"):
            assert h[k]["shape"] == [2, s["steps"], 64]
    # single-pooling runs keep their layout (and say which pooling they hold)
    h = header(runs["mean"] / "shard-00000.safetensors")
    assert h["__metadata__"]["poolings"] == "mean" and "latents.max" not in h
    assert rl.open_latents(runs["mean"]).config["pooling"] == "mean"


def test_each_stored_pooling_equals_its_single_run_and_hf(runs, model, tiny_model_dir, hf_states):
    multi = rl.open_latents(runs["multi"])
    singles = {p: rl.open_latents(runs[p]) for p in MULTI}
    worst = {p: 0.0 for p in MULTI}
    for item in multi:
        assert item.poolings == list(MULTI)
        lat = item.latents
        assert lat.shape == (2, item.meta["num_steps"], 64) and lat.dtype == np.float32
        assert np.shares_memory(lat, item.pooled("mean")) and lat.base is not None  # zero-copy
        assert not lat.flags.writeable
        ids = model.tokenizer.encode(item.meta["text"]).ids
        hs = hf_states(tiny_model_dir("llama"), ids)[[1, 3]]
        for p in MULTI:
            got = item.pooled(p)
            np.testing.assert_array_equal(got, singles[p][item.id].latents)   # bitwise
            for j, (a, b) in enumerate(item.token_spans):
                rows = hs[:, a:b]
                want = {"mean": rows.astype(np.float64).mean(1), "max": rows.max(1),
                        "last": rows[:, -1]}[p].astype(np.float32)
                worst[p] = max(worst[p], rel_err(got[:, j], want))
    assert max(worst.values()) <= TOL, worst
    with pytest.raises(KeyError, match=r"pooling 'first' is not in this run; it stores 'mean', "
                                       r"'max', 'last'"):
        multi[0].pooled("first")


def test_per_token_run_equals_hf(runs, model, tiny_model_dir, hf_states):
    store = rl.open_latents(runs["none"])
    assert store.per_token and store.poolings == ["none"] and store.config["pooling"] == "none"
    means = rl.open_latents(runs["mean"])
    h = header(runs["none"] / "shard-00000.safetensors")
    assert h["__metadata__"]["poolings"] == "none"
    worst = 0.0
    for item in store:
        n = item.meta["num_tokens"]
        ids = model.tokenizer.encode(item.meta["text"]).ids
        assert len(ids) == n
        lat = item.latents
        assert item.per_token and lat.shape == (2, n, 64) and lat.dtype == np.float32
        ref = hf_states(tiny_model_dir("llama"), ids)[[1, 3]]
        worst = max(worst, rel_err(lat, ref))
        ts = item.token_steps
        assert ts.dtype == np.int32 and ts.shape == (n,)
        want = np.full(n, -1)
        for j, (a, b) in enumerate(item.token_spans):
            want[a:b] = j
        np.testing.assert_array_equal(ts, want)
        assert ts[0] == -1          # <s> belongs to no step
        # the per-token rows pooled over the step spans are the mean run's latents
        pooled = np.stack([lat[:, a:b].astype(np.float64).mean(1) for a, b in item.token_spans], 1)
        np.testing.assert_allclose(pooled, means[item.id].latents, rtol=1e-5, atol=1e-6)
    assert worst <= TOL, worst
    # a step run derives token_steps from its spans: the same
    for a, b in zip(store, means):
        np.testing.assert_array_equal(a.token_steps, b.token_steps)
    # bf16 per-token run: the f32 values rounded
    from rjepa_latent.store.files import bf16_from_f32
    for a, b in zip(store, rl.open_latents(runs["none_bf16"])):
        np.testing.assert_array_equal(b.raw_latents, bf16_from_f32(a.latents))


def test_disk_check_prints_need_and_refuses(model, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sub" / "run"
    s = rl.extract_dataset(data, model, out, layers=(0, 1, -1), pooling="none", shard_size=5,
                           progress=False)
    tokens = s["tokens"]
    need = tokens * (3 * 64 * 4 + 4)
    err = capsys.readouterr().err
    assert (f"per-token output: {tokens:,} tokens x 3 layers x 64 hidden x 4 bytes" in err
            and "GiB free on" in err)
    shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    assert need <= shard_bytes < need + 64 * 1024    # the estimate is the payload

    calls = []

    def short(path):
        calls.append(Path(path))
        return SimpleNamespace(total=10 ** 12, used=10 ** 12 - need + 1, free=need - 1)
    monkeypatch.setattr(shutil, "disk_usage", short)
    fresh = tmp_path / "new" / "run"
    with pytest.raises(StoreError, match=rf"not enough disk for a per-token run in {fresh}: it needs "
                                         rf"{need:,} bytes .* but {tmp_path} has {need - 1:,} bytes "
                                         r"free; .*nothing was written"):
        rl.extract_dataset(data, model, fresh, layers=(0, 1, -1), pooling="none", shard_size=5,
                           progress=False)
    assert calls == [tmp_path] and not (tmp_path / "new").exists()
    assert f"{tokens:,} tokens" in capsys.readouterr().err
    # bf16 halves the need; with exactly the need free it runs
    need16 = tokens * (3 * 64 * 2 + 4)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: SimpleNamespace(total=10 ** 12, used=10 ** 12 - need16, free=need16))
    rl.extract_dataset(data, model, fresh, layers=(0, 1, -1), pooling="none", shard_size=5,
                       dtype="bfloat16", progress=False)
    assert rl.open_latents(fresh).complete
    # the CLI: exit status 2 with the reason
    monkeypatch.setattr(shutil, "disk_usage", short)
    assert cli_main(["extract", str(data), "--model", model.path, "--out", str(tmp_path / "c"),
                     "--pooling", "none", "--layers=0,1,-1", "--device", "cpu",
                     "--no-progress"]) == 2
    assert "not enough disk for a per-token run" in capsys.readouterr().err


def test_resuming_a_per_token_run_counts_only_what_is_left(model, data, tmp_path, monkeypatch,
                                                           capsys):
    out = tmp_path / "run"
    rl.extract_dataset(data, model, out, pooling="none", shard_size=5, part=(0, 2), progress=False)
    done = sum(it.meta["num_tokens"] for it in rl.open_latents(out))
    first = capsys.readouterr().err
    rl.extract_dataset(data, model, out, pooling="none", shard_size=5, part=(1, 2), progress=False)
    second = capsys.readouterr().err
    total = sum(it.meta["num_tokens"] for it in rl.open_latents(out))
    assert 0 < done < total
    assert f"per-token output: {done:,} tokens" in first
    assert f"per-token output: {total - done:,} tokens" in second


def test_run_identity_includes_the_pooling_list(runs, model, data):
    before = snapshot(runs["multi"])
    for other in (("mean", "max"), ("max", "mean", "last"), "mean", "none"):
        with pytest.raises(StoreError, match=r"pooling: stored \['mean', 'max', 'last'\], requested"):
            rl.extract_dataset(data, model, runs["multi"], layers=(1, -1), pooling=other,
                               shard_size=5, progress=False)
    assert snapshot(runs["multi"]) == before
    s = rl.extract_dataset(data, model, runs["multi"], layers=(1, -1), pooling=list(MULTI),
                           shard_size=5, progress=False)
    assert s["noop"] and snapshot(runs["multi"]) == before
    # one pooling given as a list of one is the same run as the name
    s = rl.extract_dataset(data, model, runs["mean"], layers=(1, -1), pooling=["mean"],
                           shard_size=5, progress=False)
    assert s["noop"]
    with pytest.raises(ValueError, match="pooling lists 'max' more than once"):
        rl.extract_dataset(data, model, runs["multi"], pooling=("max", "max"), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean,max,last", "none"])
def test_kill_and_resume_is_byte_identical(pooling, data, tiny_model_dir, tmp_path):
    def cmd(out):
        return [sys.executable, "-m", "rjepa_latent.cli", "extract", str(data), "--model",
                str(tiny_model_dir("llama")), "--out", str(out), "--shard-size", "4",
                "--layers=1,-1", "--pooling", pooling, "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(rl.__file__).parents[1])}
    env.pop("RJEPA_TEST_KILL_AT", None)
    subprocess.run(cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    ref = snapshot(tmp_path / "ref")
    out = tmp_path / "killed"
    died = 0
    for k in (9, 7, 13):   # write steps inside shard files of three successive runs
        r = subprocess.run(cmd(out), env={**env, "RJEPA_TEST_KILL_AT": str(k)}, capture_output=True)
        assert r.returncode in (0, -signal.SIGKILL), r.stderr.decode()[-2000:]
        died += r.returncode == -signal.SIGKILL
    assert died == 3
    r = subprocess.run(cmd(out), env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert snapshot(out) == ref


def test_an_old_single_pooling_run_still_opens(runs, tmp_path):
    """Shards written before poolings were recorded (no "poolings" metadata,
    config pooling a name) read as before, through every reader."""
    old = tmp_path / "old"
    shutil.copytree(runs["mean"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    for s in manifest["shards"]:
        name = f"shard-{s['index']:05d}.safetensors"
        arr = read_safetensors(old / name)
        chunks = safetensors_chunks([("step_offsets", "I64", np.array(arr["step_offsets"])),
                                     ("token_spans", "I32", np.array(arr["token_spans"])),
                                     ("latents", "F32", np.array(arr["latents"]))])
        s["files"][name] = atomic_write(old / name, chunks, "t")
        assert "poolings" not in header(old / name)["__metadata__"]
    manifest.pop("manifest_sha256", None)   # written before manifests carried a content hash
    (old / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    a, b = rl.open_latents(old), rl.open_latents(runs["mean"])
    assert a.poolings == ["mean"] and len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.latents, y.latents)
        np.testing.assert_array_equal(x.pooled("mean"), y.latents)
    assert rl_read.arrow_table(a, 1).equals(rl_read.arrow_table(b, 1))


def test_cli_extract_several_poolings(data, tiny_model_dir, tmp_path, runs, capsys):
    out = tmp_path / "cli"
    assert cli_main(["extract", str(data), "--model", str(tiny_model_dir("llama")), "--out",
                     str(out), "--pooling", "mean,max,last", "--layers=1,-1", "--shard-size", "5",
                     "--device", "cpu", "--no-progress"]) == 0
    assert snapshot(out) == snapshot(runs["multi"])   # the API's run, byte for byte
    with pytest.raises(SystemExit):
        cli_main(["extract", str(data), "--out", str(tmp_path / "x"), "--pooling", "mean,top"])
    assert "pooling must be one of mean, first, last, max, none; got 'top'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["extract", str(data), "--out", str(tmp_path / "x"), "--pooling", "none,mean"])
    assert "cannot be combined" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- readers ------------------------------------------------------------------

torch = pytest.importorskip("torch")


def test_torch_datasets_pick_a_pooling(runs):
    from rjepa_latent.torch import LatentDataset, StepPairs, collate_steps
    store = rl.open_latents(runs["multi"])
    for p in (None, *MULTI):
        ds = LatentDataset(runs["multi"], layer=-1, pooling=p)
        assert ds.pooling == (p or "mean")
        for i in range(len(ds)):
            np.testing.assert_array_equal(ds[i]["latents"].numpy(),
                                          store[i].pooled(p or "mean")[1])
        pairs = StepPairs(runs["multi"], layer=1, pooling=p)
        z = pairs[0]
        first = next(it for it in store if it.meta["num_steps"] > 1)
        np.testing.assert_array_equal(z["z_next"].numpy(), first.pooled(p or "mean")[0, 1])
    with pytest.raises(ValueError, match=r"pooling 'first' is not in this run; it stores 'mean', "
                                         r"'max', 'last'"):
        LatentDataset(runs["multi"], layer=-1, pooling="first")
    with pytest.raises(ValueError, match="pooling 'max' is not in this run; it stores 'mean'"):
        LatentDataset(runs["mean"], layer=-1, pooling="max")
    batch = collate_steps([LatentDataset(runs["multi"], layer=1, pooling="max")[i] for i in range(3)])
    assert batch["latents"].shape[0] == 3 and "token_steps" not in batch


def test_torch_on_a_per_token_run(runs):
    from rjepa_latent.torch import LatentDataset, StepPairs, collate_steps
    store = rl.open_latents(runs["none"])
    ds = LatentDataset(runs["none"], layer=1)
    assert ds.per_token and ds.pooling == "none"
    items = [ds[i] for i in range(len(ds))]
    for it, ref in zip(items, store):
        assert it["latents"].shape == (ref.meta["num_tokens"], 64)
        np.testing.assert_array_equal(it["latents"].numpy(), ref.latents[0])
        np.testing.assert_array_equal(it["token_steps"].numpy(), ref.token_steps)
    batch = collate_steps(items[:4])
    longest = max(it["latents"].shape[0] for it in items[:4])
    assert batch["latents"].shape == (4, longest, 64) and batch["token_steps"].shape == (4, longest)
    for b, it in enumerate(items[:4]):
        n = it["latents"].shape[0]
        assert batch["mask"][b].sum() == n and (batch["token_steps"][b, n:] == -1).all()
        assert torch.equal(batch["token_steps"][b, :n], it["token_steps"])
    bf = LatentDataset(runs["none_bf16"], layer=-1)[0]["latents"]
    assert bf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="per-token run .* no step latents to pair"):
        StepPairs(runs["none"], layer=1)


def test_arrow_hf_and_exports(runs, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    multi = rl.open_latents(runs["multi"])
    t = rl_read.arrow_table(multi, -1, "max")
    meta = json.loads(t.schema.metadata[b"rjepa_latent"])
    assert meta["pooling"] == "max" and meta["rows"] == "steps"
    for k, it in enumerate(multi):
        np.testing.assert_array_equal(np.array(t.column("latents")[k].as_py(), np.float32),
                                      it.pooled("max")[1])
    assert rl_read.arrow_table(multi, -1).equals(rl_read.arrow_table(multi, -1, "mean"))
    with pytest.raises(ValueError, match="pooling 'first' is not in this run"):
        rl_read.arrow_table(multi, -1, "first")

    tok = rl.open_latents(runs["none"])
    t = rl_read.arrow_table(tok, 1)
    assert json.loads(t.schema.metadata[b"rjepa_latent"])["rows"] == "tokens"
    assert t.column_names[:3] == ["id", "latents", "token_steps"]
    for k, it in enumerate(tok):
        row = np.array(t.column("latents")[k].as_py(), np.float32)
        assert row.shape == (it.meta["num_tokens"], 64)
        np.testing.assert_array_equal(row, it.latents[0])
        assert t.column("token_steps")[k].as_py() == it.token_steps.tolist()
    datasets = pytest.importorskip("datasets")
    ds = tok.to_hf_dataset(layer=-1)
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(tok)
    np.testing.assert_array_equal(np.array(ds[2]["latents"], np.float32), tok[2].latents[1])
    assert ds[2]["token_steps"] == tok[2].token_steps.tolist()
    assert np.array(multi.to_hf_dataset(1, "last")[0]["latents"], np.float32).shape == \
        multi[0].pooled("last")[0].shape

    res = rl_export.export_parquet(tok, tmp_path / "t.parquet", layer=-1)
    back = pq.read_table(tmp_path / "t.parquet")
    assert res["rows"] == len(tok) and back.column("token_steps")[0].as_py() == tok[0].token_steps.tolist()

    res = rl_export.export_npy(tok, tmp_path / "npy", layers=[1])
    assert res["files"] == ["latents.layer-1.npy", "token_offsets.npy", "token_steps.npy",
                            "token_positions.npy", "token_ids.npy", "items.jsonl"] and res["pooling"] == "none"
    flat = np.load(tmp_path / "npy" / "latents.layer-1.npy", mmap_mode="r")
    offs = np.load(tmp_path / "npy" / "token_offsets.npy")
    steps = np.load(tmp_path / "npy" / "token_steps.npy")
    assert flat.shape == (res["tokens"], 64) == (offs[-1], 64) and steps.shape == (offs[-1],)
    for k, it in enumerate(tok):
        np.testing.assert_array_equal(flat[offs[k]:offs[k + 1]], it.latents[0])
        np.testing.assert_array_equal(steps[offs[k]:offs[k + 1]], it.token_steps)

    res = rl_export.export_npy(multi, tmp_path / "npy_max", pooling="max")
    flat = np.load(tmp_path / "npy_max" / "latents.layer-3.npy")
    offs = np.load(tmp_path / "npy_max" / "step_offsets.npy")
    for k, it in enumerate(multi):
        np.testing.assert_array_equal(flat[offs[k]:offs[k + 1]], it.pooled("max")[1])


def test_cli_export_pooling(runs, tmp_path, capsys):
    assert cli_main(["export", str(runs["multi"]), "--format", "npy", "--out",
                     str(tmp_path / "n"), "--pooling", "last", "--layer", "1"]) == 0
    assert "pooling last" in capsys.readouterr().out
    flat = np.load(tmp_path / "n" / "latents.layer-1.npy")
    multi = rl.open_latents(runs["multi"])
    np.testing.assert_array_equal(flat[:multi[0].meta["num_steps"]], multi[0].pooled("last")[0])
    assert cli_main(["export", str(runs["multi"]), "--format", "parquet", "--out",
                     str(tmp_path / "p.parquet"), "--pooling", "first"]) == 2
    assert "pooling 'first' is not in this run" in capsys.readouterr().err

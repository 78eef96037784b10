"""Run control: growing a run when records are appended to its dataset (new
shards, old ones untouched, a partial last shard redone, ending byte-identical
to a fresh run over the grown file); a dataset changed otherwise is refused,
untouched; --limit (a trial run a later run grows) and --ids (a sample);
shard_size auto resolved once, stored and reused; a run directory of format 1
is read but not resumed."""
import json
from pathlib import Path

import pytest

import rjepa_latent as rl
from rjepa_latent.run import local as rl_local
from rjepa_latent.run import spec as rl_spec
from rjepa_latent.cli import main as cli_main
from rjepa_latent.store.info import inspect_run
from rjepa_latent.store.files import verify_run
from conftest import interrupt_at_shard


def rows(a: int, b: int) -> bytes:
    return b"".join(json.dumps({"id": f"r{i}", "question": f"q{i}?",
                                "steps": [f"step {i}", f"and {i % 5}"]}).encode() + b"\n" for i in range(a, b))


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def mtimes(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)


def run(data, model, out, **kw):
    return rl.extract_dataset(data, model, out, **{"shard_size": 4, "layers": (1,), "progress": False, **kw})


def test_growing_a_finished_run_equals_a_fresh_run(model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 10))        # shards 0, 1 full, shard 2 partial (8..10)
    out = tmp_path / "run"
    run(data, model, out)
    before = mtimes(out)
    data.write_bytes(rows(0, 10) + rows(10, 19))
    s = run(data, model, out)
    assert s["complete"] and s["grown"] and s["shards_written"] == 3   # 2 (redone), 3, 4
    after = mtimes(out)
    for name in ("shard-00000.safetensors", "shard-00001.jsonl", "shard-00001.json"):
        assert after[name] == before[name]            # full shards untouched
    assert after["shard-00002.json"] != before["shard-00002.json"]
    fresh = tmp_path / "fresh"
    run(data, model, fresh)
    assert snapshot(out) == snapshot(fresh)
    assert "the dataset grew" in capsys.readouterr().err
    assert run(data, model, out)["noop"]
    r = inspect_run(out)
    assert r["complete"] and r["records_total"] == 19 and verify_run(out) == {}


def test_growing_an_interrupted_run(model, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 14))
    out = tmp_path / "run"
    compute = interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(data, model, out)
    monkeypatch.setattr(rl_local._Runner, "_compute", compute)
    assert inspect_run(out)["shards_done"] == 2 and not inspect_run(out)["complete"]
    data.write_bytes(rows(0, 14) + rows(14, 21))
    run(data, model, out)
    fresh = tmp_path / "fresh"
    run(data, model, fresh)
    assert snapshot(out) == snapshot(fresh)


@pytest.mark.parametrize("change", ["edited", "no_line_end", "shrunk", "renamed"])
def test_a_dataset_changed_otherwise_is_refused_untouched(model, tmp_path, monkeypatch, change):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 10))
    out = tmp_path / "run"
    compute = interrupt_at_shard(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(data, model, out)    # a partial run: shard 0 committed
    monkeypatch.setattr(rl_local._Runner, "_compute", compute)
    before = snapshot(out)
    if change == "edited":       # a record in the middle changed, then records appended
        data.write_bytes(rows(0, 10).replace(b'"q5?"', b'"Q5?"') + rows(10, 12))
    elif change == "no_line_end":   # the old last line did not end: appending extends a record
        data.write_bytes(rows(0, 10)[:-1])
        with pytest.raises(rl.StoreError):
            run(data, model, out)
        before = snapshot(out)
        data.write_bytes(rows(0, 10)[:-1] + b', "x": 1}\n')
    elif change == "shrunk":
        data.write_bytes(rows(0, 9))
    else:
        data = data.rename(tmp_path / "e.jsonl")
    with pytest.raises(rl.StoreError, match="(?s)not extend it.*inputs: stored"):
        run(data, model, out)
    assert snapshot(out) == before


def test_limit_is_a_trial_run_a_later_run_grows(model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 17))
    out = tmp_path / "run"
    s = run(data, model, out, limit=7)
    assert s["complete"] and s["records"] == 7 and s["items"] == 7
    assert json.loads((out / "manifest.json").read_text())["config"]["limit"] == 7
    assert rl.open_latents(out).ids == [f"r{i}" for i in range(7)]
    with pytest.raises(rl.StoreError, match="limit: stored 7, requested 5"):
        run(data, model, out, limit=5)      # shrinking is refused
    assert run(data, model, out, limit=7)["noop"]
    assert cli_main(["extract", str(data), "--model", str(model.path), "--out", str(out), "--shard-size",
                     "4", "--layers=1", "--device", "cpu", "--no-progress", "--limit", "9"]) == 0
    assert len(rl.open_latents(out)) == 9
    s = run(data, model, out)               # no limit: the whole dataset
    assert s["complete"] and s["records"] == 17
    fresh = tmp_path / "fresh"
    run(data, model, fresh)
    assert snapshot(out) == snapshot(fresh)


def test_ids_sample(model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 12) + b"not json\n")
    ids = tmp_path / "ids.txt"
    ids.write_text("r3\n\n  r10 \nr1\nnope\nr3\nalso-missing\n")
    out = tmp_path / "run"
    assert cli_main(["extract", str(data), "--model", str(model.path), "--out", str(out), "--shard-size",
                     "4", "--layers=1", "--device", "cpu", "--no-progress", "--ids", str(ids)]) == 0
    err = capsys.readouterr().err
    assert "2 of the 5 --ids are not in the inputs: 'nope', 'also-missing'" in err
    st = rl.open_latents(out)
    assert st.complete and st.ids == ["r1", "r3", "r10"] and st.errors == []
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert cfg["ids"]["count"] == 5
    s = run(data, model, out, ids=["r3", "r10", "r1", "nope", "also-missing"])
    assert s["noop"]
    with pytest.raises(rl.StoreError, match="ids: stored"):
        run(data, model, out)               # a sample is not grown into the whole run
    with pytest.raises(ValueError, match="holds no id"):
        (tmp_path / "empty.txt").write_text("\n")
        run(data, model, tmp_path / "x", ids=tmp_path / "empty.txt")
    assert not (tmp_path / "x").exists()


def test_auto_shard_size_is_stored_and_reused_on_resume(model, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 60))
    monkeypatch.setattr(rl_spec, "SHARD_TARGET_S", 1e-6)   # the smallest auto size (10 here)
    ref = tmp_path / "ref"
    run(data, model, ref, shard_size="auto")
    cfg = json.loads((ref / "manifest.json").read_text())["config"]
    assert cfg["shard_size"] == rl_spec.SHARD_SIZE_RANGE[0] == 10
    out = tmp_path / "run"
    compute = interrupt_at_shard(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(data, model, out, shard_size="auto")
    monkeypatch.setattr(rl_local._Runner, "_compute", compute)
    monkeypatch.setattr(rl_spec, "SHARD_TARGET_S", 1e6)    # auto would now pick far larger shards
    m = rl.Model(model.path, device="cpu", threads=1)
    spec = rl_spec.run_spec(data, layers=(1,))
    assert rl_spec.run_config(spec, m)["shard_size"] == rl_spec.SHARD_SIZE_RANGE[1]
    s = run(data, model, out, shard_size="auto")           # resumes with the stored 10
    assert s["shard_size"] == 10 and s["shards_written"] == 3
    assert snapshot(out) == snapshot(ref)
    with pytest.raises(rl.StoreError, match="shard_size: stored 10, requested 20"):
        run(data, model, out, shard_size=20)               # an explicit size must match


def test_auto_shard_size_rule(model, tmp_path):
    """From the model, the device kind and the mean text length; never the record count."""
    short, long_ = tmp_path / "s.jsonl", tmp_path / "l.jsonl"
    short.write_bytes(rows(0, 300))
    long_.write_bytes(b"".join(json.dumps({"id": f"r{i}", "steps": ["word " * 400]}).encode() + b"\n"
                               for i in range(300)))
    lays = model.resolve_layers((1,))
    a = rl_spec.auto_shard_size(rl_spec.run_spec(short), model, lays)
    b = rl_spec.auto_shard_size(rl_spec.run_spec(long_), model, lays)
    assert a > b >= rl_spec.SHARD_SIZE_RANGE[0] and str(a)[0] in "125" and str(b)[0] in "125"
    grown = tmp_path / "g.jsonl"
    grown.write_bytes(rows(0, 300) + rows(300, 3000))   # the first records decide: growing keeps it
    assert rl_spec.auto_shard_size(rl_spec.run_spec(grown), model, lays) == \
        rl_spec.auto_shard_size(rl_spec.run_spec(short), model, lays)


def _as_format_1(out: Path) -> None:
    """Rewrite a finished format-2 run as format 1 wrote it: one manifest, no journal."""
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 1
    m.pop("manifest_sha256")   # format 1 carried no content hash
    (out / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    for p in out.glob("shard-*.json"):
        p.unlink()


def test_a_format_1_run_is_read_but_not_resumed(model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows(0, 9))
    out = tmp_path / "run"
    run(data, model, out)
    ids = rl.open_latents(out).ids
    _as_format_1(out)
    before = snapshot(out)
    st = rl.open_latents(out)
    assert st.complete and st.ids == ids and st[0].latents.shape[0] == 1
    assert inspect_run(out)["format_version"] == 1 and verify_run(out) == {}
    with pytest.raises(rl.StoreError, match="(?s)format 1.*does not resume or grow.*new --out"):
        run(data, model, out)
    assert cli_main(["verify", str(out), "--quiet"]) == 0
    assert snapshot(out) == before

"""Nothing damaged is served or counted as done: one flipped payload byte, a
shard header edited F32 -> I32, an edited id, two sidecar lines swapped, a
deleted shard file, an edited errors.jsonl are each found (by the reader, by
`rjepa-latent verify`, by a resume), and `extract --repair` mends each, ending
byte-identical to an untouched run. Sidecars are strict JSON."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import StoreError
from rjepa_latent.cli import main as cli_main
from rjepa_latent.store.write import RunStore
from rjepa_latent.store.files import verify_run

SHARD = 3
RECORDS = [{"id": f"r{i}", "question": f"What is {i} plus {i}?",
            "steps": [f"Add {i} and {i}.", f"The sum is {2 * i}."]} for i in range(11)]


def _strict_loads(line: str):
    def refuse(name):
        raise ValueError(f"bare {name} in a sidecar")
    return json.loads(line, parse_constant=refuse)


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return rl.Model(tiny_model_dir("llama"), device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("integrity")
    lines = [json.dumps(r) for r in RECORDS]
    lines[1] = '{"id": "broken", "steps": ['                       # an error record in shard 0
    lines[7] = lines[7][:-1] + ', "ok": 1.5}'
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    ref = root / "reference"
    s = rl.extract_dataset(data, model, ref, shard_size=SHARD, progress=False)
    assert s["complete"] and s["errors"] == 1 and s["repaired"] == []
    return SimpleNamespace(root=root, data=data, ref=ref, snap=snapshot(ref))


def test_sidecars_are_strict_json_and_nonfinite_fields_are_null(run, model, tmp_path):
    """JSON input refuses NaN (data.py reads strict JSON), but Parquet / Dataset
    columns carry it: the sidecar writes null and lists the field."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [dict(r) for r in RECORDS[6:9]]
    rows[1].update(score=float("nan"), w=float("-inf"), ok=1.5)
    rows[2].update(nonfinite_fields="mine", record_nonfinite_fields=2, z=float("nan"))
    cols = sorted({k for r in rows for k in r})
    data = tmp_path / "nan.parquet"
    pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in cols}), data)
    out = tmp_path / "run"
    s = rl.extract_dataset(data, model, out, shard_size=SHARD, progress=False)
    assert s["complete"] and s["errors"] == 0
    for p in sorted(out.glob("shard-*.jsonl")):
        for line in p.read_text().splitlines():
            _strict_loads(line)   # raises on a bare NaN / Infinity
    row = rl.open_latents(out)["r7"].meta
    assert row["score"] is None and row["w"] is None and row["ok"] == 1.5
    assert row["nonfinite_fields"] == ["score", "w"]
    assert "nonfinite_fields" not in rl.open_latents(out)["r6"].meta
    row = rl.open_latents(out)["r8"].meta   # input fields of the reserved name are kept, renamed
    assert row["record_record_nonfinite_fields"] == "mine" and row["record_nonfinite_fields"] == 2
    assert row["nonfinite_fields"] == ["z"] and row["z"] is None
    assert verify_run(out) == {}
    for p in sorted(run.ref.glob("shard-*.jsonl")):
        for line in p.read_text().splitlines():
            _strict_loads(line)


def test_carried_field_never_replaces_a_reserved_key(tmp_path):
    cfg = {"model_fingerprint": "abc", "layers": [1], "hidden_size": 4, "dtype": "float32",
           "pooling": "mean", "shard_size": 2}
    st = RunStore(tmp_path / "run", cfg)
    st.prepare(2)
    for bad in ({"id": "x"}, {"text": "y"}):
        it = SimpleNamespace(id="a", ids=np.arange(3, dtype=np.int32), text="t", source="f.jsonl", line=1,
                             spans=np.array([[0, 3]], np.int32), meta=bad)
        with pytest.raises(StoreError, match="reserved"):
            st.write_shard(0, (0, 2), [it], [np.zeros((1, 1, 4), np.float32)], [])
    st.close()


def _flip_last_byte(p: Path):
    b = bytearray(p.read_bytes())
    b[-1] ^= 0x01          # the last byte of the last latents tensor: payload, same size
    p.write_bytes(bytes(b))


def _header_dtype(p: Path):
    b = p.read_bytes()
    old = b'"latents":{"dtype":"F32"'
    assert b.count(old) == 1
    p.write_bytes(b.replace(old, b'"latents":{"dtype":"I32"'))


def _swap_lines(p: Path):
    lines = p.read_bytes().split(b"\n")
    lines[0], lines[1] = lines[1], lines[0]
    p.write_bytes(b"\n".join(lines))


def _edit_id(p: Path):
    b = p.read_bytes()
    p.write_bytes(b.replace(b'"id": "r4"', b'"id": "r9"', 1))


DAMAGE = {   # kind: (file, how, found by every open / resume without hashing the payload)
    "payload_byte": ("shard-00001.safetensors", _flip_last_byte, False),
    "header_dtype": ("shard-00001.safetensors", _header_dtype, True),
    "swapped_lines": ("shard-00001.jsonl", _swap_lines, True),
    "edited_id": ("shard-00001.jsonl", _edit_id, True),
    "deleted_shard": ("shard-00002.safetensors", lambda p: p.unlink(), True),
    "deleted_sidecar": ("shard-00003.jsonl", lambda p: p.unlink(), True),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_found_and_repaired(run, model, kind, capsys):
    fname, damage, quick = DAMAGE[kind]
    out = run.root / kind
    shutil.copytree(run.ref, out)
    damage(out / fname)
    index = int(fname[6:11])

    # the reader: never serves the damaged shard's bytes silently
    if quick:
        with pytest.raises(StoreError, match=fname.replace(".", r"\.")):
            store = rl.open_latents(out)
            for it in store:
                it.latents
    else:   # a payload flip is invisible to a header check; verify=True hashes it
        with pytest.raises(StoreError, match=fname.replace(".", r"\.")):
            rl.open_latents(out, verify=True)
    if kind == "header_dtype":   # the old reader returned int32 arrays here
        with pytest.raises(StoreError, match=r"'latents' is I32 .* manifest says F32"):
            rl.open_latents(out)["r3"]

    # rjepa-latent verify: exit 1, names the file
    capsys.readouterr()
    assert cli_main(["verify", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert str(out / fname) in printed and "1 damaged or missing file" in printed

    # a plain resume does not say "complete": it stops, pointing at --repair
    if quick:
        with pytest.raises(StoreError, match=r"(?s)damaged or missing.*--repair") as e:
            rl.extract_dataset(run.data, model, out, shard_size=SHARD, progress=False)
        assert fname in str(e.value)

    s = rl.extract_dataset(run.data, model, out, shard_size=SHARD, progress=False, repair=True)
    assert s["repaired"] == [index] and s["shards_written"] == 1 and s["complete"]
    assert snapshot(out) == run.snap
    assert cli_main(["verify", str(out)]) == 0


@pytest.mark.parametrize("repair", [False, True])
def test_stale_errors_jsonl_is_found_and_rewritten(run, model, repair, capsys):
    # what a kill between the complete manifest and errors.jsonl leaves (or an edit)
    out = run.root / f"errors_edit_{repair}"
    shutil.copytree(run.ref, out)
    (out / "errors.jsonl").write_text("")
    assert set(verify_run(out)) == {"errors.jsonl"}
    assert cli_main(["verify", str(out)]) == 1
    s = rl.extract_dataset(run.data, model, out, shard_size=SHARD, progress=False, repair=repair)
    assert not s["noop"] and s["repaired"] == [] and s["shards_written"] == 0
    assert snapshot(out) == run.snap


def test_repair_of_two_shards_through_the_cli(run, tiny_model_dir, capsys):
    out = run.root / "cli_repair"
    shutil.copytree(run.ref, out)
    _flip_last_byte(out / "shard-00000.safetensors")
    _swap_lines(out / "shard-00002.jsonl")
    cmd = ["extract", str(run.data), "--model", str(tiny_model_dir("llama")), "--out", str(out),
           "--shard-size", str(SHARD), "--device", "cpu", "--no-progress"]
    assert cli_main(cmd) == 2                       # the sidecar swap stops a plain resume
    assert "--repair" in capsys.readouterr().err
    assert cli_main(cmd + ["--repair"]) == 0
    assert "redid shard(s) 0, 2" in capsys.readouterr().err
    assert snapshot(out) == run.snap
    assert cli_main(cmd + ["--repair"]) == 0        # sound now: nothing redone
    assert "no shard was damaged" in capsys.readouterr().err and snapshot(out) == run.snap


def test_verify_cannot_run(tmp_path, capsys):
    assert cli_main(["verify", str(tmp_path / "absent")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli_main(["verify", str(tmp_path / "empty")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    assert cli_main(["verify", str(tmp_path / "bad")]) == 2
    assert "manifest" in capsys.readouterr().err


@pytest.mark.parametrize("kill_at", [1, 3, 6])
def test_a_repair_killed_half_way_is_finished_by_running_it_again(run, tiny_model_dir, kill_at):
    out = run.root / f"killed_repair_{kill_at}"
    shutil.copytree(run.ref, out)
    _flip_last_byte(out / "shard-00001.safetensors")
    _swap_lines(out / "shard-00001.jsonl")
    cmd = [sys.executable, "-m", "rjepa_latent.cli", "extract", str(run.data), "--model",
           str(tiny_model_dir("llama")), "--out", str(out), "--shard-size", str(SHARD), "--device", "cpu",
           "--no-progress", "--repair"]
    env = {**os.environ, "PYTHONPATH": str(Path(rl.__file__).parents[1])}
    r = subprocess.run(cmd, env={**env, "RJEPA_TEST_KILL_AT": str(kill_at)}, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert snapshot(out) != run.snap
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "redid shard(s) 1" in r.stderr
    assert snapshot(out) == run.snap


def test_verify_of_a_partial_run_says_so(tmp_path, capsys):
    cfg = {"model_fingerprint": "abc", "layers": [1], "hidden_size": 4, "dtype": "bfloat16",
           "pooling": "mean", "shard_size": 2}
    st = RunStore(tmp_path / "run", cfg)
    st.prepare(6)
    it = SimpleNamespace(id="a", ids=np.arange(3, dtype=np.int32), text="t", source="f.jsonl", line=1,
                         spans=np.array([[0, 3]], np.int32), meta={})
    st.write_shard(1, (2, 4), [it], [np.zeros((1, 1, 4), np.uint16)], [])
    st.close()
    assert cli_main(["verify", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    # a partial run knows its record count only when it finishes (records are streamed)
    assert "1 listed shards sound" in printed and "not complete: 1 shards done so far" in printed


def _as_partial(out: Path, keep: int) -> None:
    """What a kill leaves after `keep` committed shards: the start manifest and their journal."""
    m = json.loads((out / "manifest.json").read_text())
    start = {k: m[k] for k in ("format", "format_version", "config")} | {"complete": False}
    (out / "manifest.json").write_text(json.dumps(start, indent=1, ensure_ascii=False) + "\n")
    (out / "errors.jsonl").unlink()
    for k in range(keep, m["num_shards"]):
        for ext in ("safetensors", "jsonl", "json"):
            (out / f"shard-{k:05d}.{ext}").unlink()


JOURNAL_DAMAGE = {
    "not_json": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "nan": lambda p: p.write_bytes(p.read_bytes().replace(b'"steps": ', b'"x": NaN, "steps": ')),
    "other_shard": lambda p: p.write_bytes(p.read_bytes().replace(b'"index": 1,', b'"index": 2,')),
    "item_count": lambda p: p.write_bytes(p.read_bytes().replace(b'"items": 3', b'"items": 2')),
}


@pytest.mark.parametrize("kind", sorted(JOURNAL_DAMAGE))
def test_damaged_journal_entry_is_found_and_repaired(run, model, kind, capsys):
    """The journal is held to the manifest's rules: strict JSON of its own shard, its
    counts checked against the shard's header; --repair redoes that shard."""
    out = run.root / f"journal_{kind}"
    shutil.copytree(run.ref, out)
    _as_partial(out, keep=3)
    JOURNAL_DAMAGE[kind](out / "shard-00001.json")
    # a wrong count is found by the files it describes (the sidecar's lines, the header's shapes)
    named = r"shard-00001\.json\b" if kind != "item_count" else r"shard-00001\.(jsonl|safetensors)"
    with pytest.raises(StoreError, match=named):
        for it in rl.open_latents(out):
            it.latents
    capsys.readouterr()
    assert cli_main(["verify", str(out), "--no-progress"]) == 1
    assert re.search(re.escape(str(out)) + "/" + named, capsys.readouterr().out)
    with pytest.raises(StoreError, match=r"(?s)damaged or missing.*" + named):
        rl.extract_dataset(run.data, model, out, shard_size=SHARD, progress=False)
    s = rl.extract_dataset(run.data, model, out, shard_size=SHARD, progress=False, repair=True)
    assert s["repaired"] == [1] and s["complete"]
    assert snapshot(out) == run.snap


def test_finished_run_keeps_its_journal_equal_to_the_manifest(run, model, capsys):
    out = run.root / "journal_of_finished"
    shutil.copytree(run.ref, out)
    (out / "shard-00002.json").unlink()
    assert verify_run(out) == {"shard-00002.json": "missing or not the manifest's entry of its shard"}
    s = rl.extract_dataset(run.data, model, out, shard_size=SHARD, progress=False, repair=True)
    assert s["repaired"] == [2] and snapshot(out) == run.snap


def test_verify_lists_a_journal_entry_beyond_a_finished_run(run, capsys):
    # a stray entry of a shard the run does not hold (11 records: shards 0..3) is not silently sound
    out = run.root / "journal_beyond"
    shutil.copytree(run.ref, out)
    entry = json.loads((out / "shard-00001.json").read_text())
    (out / "shard-00009.json").write_text(json.dumps({**entry, "index": 9}) + "\n")
    bad = verify_run(out)
    assert list(bad) == ["shard-00009.json"] and "does not hold" in bad["shard-00009.json"]
    assert cli_main(["verify", str(out)]) != 0
    said = capsys.readouterr()
    assert "shard-00009.json" in said.out + said.err
    (out / "shard-00009.json").unlink()
    assert verify_run(out) == {} and snapshot(out) == run.snap


def test_early_stop_writes_strict_errors_under_the_lock(tmp_path, model):
    """The early stop's errors.jsonl goes through the store's writer (strict JSON) and
    only while it holds the directory lock: beside a running run it is refused, unwritten."""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join('{"id": "b%d", "nope": NaN}\n' % i for i in range(5)))
    out = tmp_path / "run"
    out.mkdir()
    holder = RunStore(out, {"shard_size": 1})
    holder._lock_directory(True)          # another run holds the directory
    with pytest.raises(StoreError, match="in use by another"):
        rl.extract_dataset(data, model, out, progress=False)
    assert list(out.iterdir()) == []
    holder.close()
    with pytest.raises(rl.run.driver.NothingExtracted):
        rl.extract_dataset(data, model, out, progress=False)
    lines = (out / "errors.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(_strict_loads(x)["reason"].startswith("cannot tell the format") for x in lines)

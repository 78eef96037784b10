"""`rjepa-latent info RUN` and `rjepa-latent --version`: a run directory read
from its manifests (complete, partial, `--part` workers), errors grouped by
reason, --json, and a clear exit 2 (never a traceback) for missing, foreign,
damaged directories."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from rjepa_latent.store.info import inspect_run, reason_group

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"id": f"r{i}", "question": f"Question {i}?", "steps": [f"Step one {i}.", f"Step two {i}."]}
           for i in range(7)]
BAD = ['{"id": "broken", "steps": [', '{"id": "nosteps", "steps": "x"}',
       json.dumps({"id": "long1", "steps": [" ".join(["word"] * 1200)]}),
       json.dumps({"id": "long2", "steps": [" ".join(["word"] * 1100)]}),
       json.dumps({"id": "huge", "steps": ["word " * 100_000]})]  # refused from its length


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    with rl.Model(tiny_model_dir("llama"), device="cpu") as m:
        yield m


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("info") / "recs.jsonl"
    lines = [json.dumps(r) for r in RECORDS] + BAD
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def cli(*args, env=None):
    """The console script in a subprocess: (exit status, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "rjepa_latent.cli", *map(str, args)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_complete_run(model, data, tmp_path, capsys):
    out = tmp_path / "run"
    rl.extract_dataset(data, model, out, shard_size=4, progress=False)
    r = inspect_run(out)
    assert r["complete"] and r["records_done"] == r["records_total"] == 12
    assert (r["shards_done"], r["shards_total"]) == (3, 3)
    assert r["items"] == 7 and r["errors"] == 5 and r["steps"] == 14
    groups = {g["reason"]: g["count"] for g in r["errors_by_reason"]}
    # the two too-long texts (different token counts) are one reason
    long_reason = [k for k in groups if "tokens, more than --max-tokens" in k]
    assert len(long_reason) == 1 and groups[long_reason[0]] == 2, groups
    assert sum(groups.values()) == 5 and len(groups) == 4
    cfg = r["config"]
    assert cfg["model_fingerprint"] == model.fingerprint and cfg["model_type"] == "llama"
    assert cfg["layers"] == [2] and cfg["pooling"] == "mean" and cfg["dtype"] == "float32"
    assert cfg["engine_backend"] == "cpu" and cfg["package_version"] == rl.__version__
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "status: complete" in text and "records: 12 of 12 done" in text
    assert "shards: 3 of 3 done" in text and "errors: 5" in text and "2 x text has N tokens" in text
    assert "1 x text has N characters" in text
    assert f"model_fingerprint: {model.fingerprint}" in text
    assert cli_main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(r))


def test_partial_and_part_runs(model, data, tmp_path, capsys):
    out = tmp_path / "parts"
    rl.extract_dataset(data, model, out, shard_size=2, part=(1, 3), progress=False)
    r = inspect_run(out)  # only worker 1 of 3 ran: shards 1 and 4 of 6, read from the journal
    # (the total is known when the run finishes: records are streamed; the journal
    # replaced the per-part manifests, so there is no per-worker list)
    assert not r["complete"] and (r["shards_done"], r["shards_total"]) == (2, None)
    assert r["records_done"] == 4 and r["records_total"] is None and r["parts"] == []
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "status: not complete" in text and "records: 4 done (the total is known when" in text
    assert "shards: 2 done" in text
    for i in (0, 2):
        rl.extract_dataset(data, model, out, shard_size=2, part=(i, 3), progress=False)
    r = inspect_run(out)
    assert r["complete"] and r["records_done"] == 12 and r["shards_done"] == 6
    assert (r["records_total"], r["shards_total"]) == (12, 6)


def test_reason_group():
    assert reason_group("step 3 has no token of its own (characters 10:20, 'abc')") == \
        reason_group("step 1 has no token of its own (characters 0:4, 'x\\'y')")
    # one rule with extract's summary (store.error_kind): a reason's head is its kind
    from rjepa_latent.store.files import error_kind
    for r in ("invalid JSON: a", "step 12 is an empty string", "duplicate id 'a:1' (first seen at d.jsonl:1)"):
        assert reason_group(r) == error_kind(r)
    assert reason_group("invalid JSON: a") == reason_group("invalid JSON: b") == "invalid JSON"
    assert reason_group("step 1 is an empty string") != reason_group("'text' is empty")


@pytest.mark.parametrize("case", ["missing", "file", "empty", "foreign", "bad_json", "not_ours",
                                  "no_config", "shard_gone", "shard_size", "mixed"])
def test_refusals_exit_2_without_traceback(case, model, data, tmp_path):
    d = tmp_path / "d"
    if case == "missing":
        pass
    elif case == "file":
        d.write_text("x")
    elif case in ("empty", "foreign"):
        d.mkdir()
        if case == "foreign":
            (d / "notes.txt").write_text("mine")
    else:
        rl.extract_dataset(data, model, d, shard_size=4, progress=False)
        man = d / "manifest.json"
        m = json.loads(man.read_text())
        if case == "bad_json":
            man.write_text(man.read_text()[:50])
        elif case == "not_ours":
            man.write_text(json.dumps({"hello": 1}))
        elif case == "no_config":
            del m["shards"]
            man.write_text(json.dumps(m))
        elif case == "shard_gone":
            (d / "shard-00001.safetensors").unlink()
        elif case == "shard_size":
            with open(d / "shard-00000.jsonl", "a") as f:
                f.write("{}\n")
        elif case == "mixed":
            m2 = dict(m, config={**m["config"], "pooling": "last"}, part=[0, 2])
            (d / "manifest.part-00000-of-00002.json").write_text(json.dumps(m2))
    with pytest.raises((rl.StoreError, FileNotFoundError)):
        inspect_run(d)
    rc, out, err = cli("info", d)
    assert rc == 2 and out == "" and "Traceback" not in err, err
    assert err.startswith("rjepa-latent info: error: ") and str(d) in err
    expect = {"missing": "does not exist", "file": "not a directory", "empty": "no manifest.json",
              "foreign": "notes.txt", "bad_json": "cannot read the manifest",
              "not_ours": "not an rjepa-latent manifest", "no_config": "damaged",
              "shard_gone": "shard-00001.safetensors", "shard_size": "wrong size",
              "mixed": "mixes two runs"}[case]
    assert expect in err, err


def test_version():
    rc, out, err = cli("--version")
    assert rc == 0, err
    info = rl.build_info()
    assert out.startswith(f"rjepa-latent {rl.__version__}\n")
    assert info["blas"] in out
    if info["cuda"]:
        assert f"CUDA compiled in ({info['cuda_arch']})" in out
    else:
        assert "CUDA not compiled in (CPU only)" in out


def test_every_stored_option_is_shown(model, data, tmp_path, capsys):
    """A --limit run says so beside its counts, and every stored option of the
    manifest (limit, ids, strip_annotations, segment ...) is a line of `info`."""
    ids = tmp_path / "ids.txt"
    ids.write_text("r0\nr1\nr2\n")
    out = tmp_path / "run"
    rl.extract_dataset(data, model, out, shard_size=4, progress=False, limit=5, ids=str(ids),
                       strip_annotations=True, segment="lines")
    stored = json.loads((out / "manifest.json").read_text())["config"]
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(--limit 5: the first 5 records of the input)" in text
    for key in stored:
        if key != "inputs":
            assert f"\n  {key}: " in text, (key, text)
    assert "  limit: 5" in text and "  strip_annotations: true" in text and "  segment: lines" in text
    assert "  ids: 3 ids (sha256 " in text
    r = inspect_run(out)
    assert set(r["config"]) == set(stored) - {"inputs"}


def test_chat_run_marks_the_unused_template():
    from rjepa_latent.store.info import format_info
    r = {"path": "run", "complete": True, "records_done": 1, "records_total": 1, "shards_done": 1,
         "shards_total": 1, "items": 1, "steps": 1, "tokens": 5, "errors": 0, "errors_by_reason": [],
         "parts": [], "inputs": [], "shard_kernels": [],
         "config": {"chat": True, "chat_think": False, "system": None,
                    "template": "{question}\n{steps}", "step_separator": "\n"}}
    text = format_info(r)
    assert "  chat: true" in text and "  chat_think: false" in text and "  system: null" in text
    assert "  template: '{question}\\n{steps}' (not used: --chat renders the records)" in text


def test_info_into_a_closed_pipe_is_quiet(model, data, tmp_path):
    """`rjepa-latent info RUN | head -1`: the first line, no BrokenPipeError traceback."""
    out = tmp_path / "run"
    rl.extract_dataset(data, model, out, shard_size=4, progress=False)
    r = subprocess.run(f"{sys.executable} -m rjepa_latent.cli info {out} | head -1", shell=True,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout == f"run: {out}\n"
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_help_describes_the_tool_and_each_command():
    code, text, err = cli("--help")
    assert code == 0, err
    assert "Extract pooled hidden states" in text and "lives in the module" not in text
    from rjepa_latent.cli import SUBCOMMANDS
    for name, (_, summary) in SUBCOMMANDS.items():
        assert name in text and summary.split()[0] in text, name

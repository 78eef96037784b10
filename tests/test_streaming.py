"""The shard seam and the journal: ShardWorkers in other processes commit into
one run directory at once and the result is byte-identical to a single run;
a commit writes the same amount at shard 1 and at shard 500; records are read
lazily (about one shard ahead); duplicate ids are found by exact id at any
distance, naming the first occurrence."""
import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.run import driver as rl_driver
from rjepa_latent.store import files as rl_files
from rjepa_latent.store import write as rl_write
from rjepa_latent.inputs.data import IdIndex, read_records
from rjepa_latent.run.driver import RunDriver
from rjepa_latent.run.spec import RunSpec, run_config, run_spec
from rjepa_latent.run.worker import ShardWorker


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _rows(n: int, prefix: str = "r") -> bytes:
    return b"".join(json.dumps({"id": f"{prefix}{i}", "question": f"q {i}?",
                                "steps": [f"step one of {i}", f"then {i * 7 % 13}"]}).encode() + b"\n"
                    for i in range(n))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _worker_main(model_dir: str, spec_bytes: bytes, out: str, jobs, results) -> None:
    """A worker process: its own Model and ShardWorker; commits whatever shards it is given."""
    spec = pickle.loads(spec_bytes)
    m = rl.Model(model_dir, device="cpu", threads=1)
    w = ShardWorker(m, spec, out)
    while True:
        job = jobs.get()
        if job is None:
            break
        s = w.run_shard(*job)
        results.put(pickle.dumps(s))   # the summary is small and picklable
    m.close()


def test_two_worker_processes_commit_into_one_directory(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_rows(37) + b'{"id": "r3", "steps": ["dup"]}\n' + b"not json\n" + _rows(5, "s"))
    ref = tmp_path / "ref"
    rl.extract_dataset(data, str(model_dir), ref, shard_size=4, layers=(1,), device="cpu", progress=False)

    spec = run_spec(data, shard_size=4, layers=(1,), model=str(model_dir))
    assert pickle.loads(pickle.dumps(spec)) == spec
    m = rl.Model(model_dir, device="cpu", threads=1)
    config = run_config(spec, m)
    m.close()
    out = tmp_path / "run"
    driver = RunDriver(spec, config, out)
    driver.check()
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(Path(rl.__file__).parents[1])
    try:
        procs = [ctx.Process(target=_worker_main, args=(str(model_dir), pickle.dumps(spec), str(out), jobs,
                                                        results)) for _ in range(2)]
        n = 0
        for k, rng, recs in driver.pending():   # the driver locks and starts the run first
            if n == 0:
                for p in procs:
                    p.start()
            jobs.put((k, rng, recs))
            n += 1
        for _ in procs:
            jobs.put(None)
        summaries = [pickle.loads(results.get(timeout=300)) for _ in range(n)]
        for p in procs:
            p.join(300)
            assert p.exitcode == 0
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
    assert sorted(s["index"] for s in summaries) == list(range(n)) and n == 11
    assert all(set(s) == {"index", "records", "items", "steps", "tokens", "errors", "seconds", "entry"}
               for s in summaries)
    assert not driver.store.is_complete()
    for s in summaries:
        driver.note(s["entry"])
    assert driver.finish() and driver.finish()   # idempotent
    driver.close()
    assert snapshot(out) == snapshot(ref)        # byte-identical to one process, temporaries gone
    assert sum(s["errors"] for s in summaries) == 2


def test_worker_refuses_a_run_of_other_options(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_rows(6))
    spec = run_spec(data, shard_size=2, layers=(1,), model=str(model_dir))
    m = rl.Model(model_dir, device="cpu")
    with pytest.raises(rl.StoreError, match="no manifest.json"):
        ShardWorker(m, spec, tmp_path / "run").run_shard(0, (0, 2), [])
    driver = RunDriver(spec, run_config(spec, m), tmp_path / "run")
    k, rng, recs = next(driver.pending())
    other = run_spec(data, shard_size=2, layers=(2,), model=str(model_dir))
    with pytest.raises(rl.StoreError, match="layers: stored"):
        ShardWorker(m, other, tmp_path / "run").run_shard(k, rng, recs)
    s = ShardWorker(m, spec, tmp_path / "run").run_shard(k, rng, recs)
    assert s["items"] == 2 and (tmp_path / "run" / "shard-00000.json").is_file()
    driver.close()
    m.close()


def _fake_items(n, start):
    return [SimpleNamespace(id=f"r{start + i}", ids=np.arange(5, dtype=np.int32), text=f"t{i}",
                            source="f.jsonl", line=start + i + 1, meta={},
                            spans=np.array([[1, 3], [3, 5]], np.int32)) for i in range(n)]


def test_commit_writes_the_same_at_shard_1_and_shard_500(tmp_path, monkeypatch):
    """The journal makes a commit O(1): what one commit writes does not grow with
    the shards (or the errors) committed before it."""
    cfg = {"model_fingerprint": "abc", "layers": [1], "hidden_size": 4, "dtype": "float32",
           "pooling": "mean", "shard_size": 2}
    st = rl_write.RunStore(tmp_path / "run", cfg)
    st.prepare()
    written = []
    real = rl_files.atomic_write

    def counting(path, chunks, tag):
        info = real(path, chunks, tag)
        written.append(info["bytes"])
        return info
    monkeypatch.setattr(rl_write, "atomic_write", counting)
    errs = [{"id": "e", "source": "f.jsonl", "line": 1, "reason": "bad record, always the same"}] * 2
    per_commit = []
    for k in range(500):
        written.clear()
        st.write_shard(k, (2 * k, 2 * k + 2), _fake_items(1, 2 * k), [np.zeros((1, 2, 4), np.float32)],
                       errs if k % 2 else [])
        per_commit.append((len(written), sum(written)))
    # files per commit: safetensors, jsonl, journal entry; bytes differ only by the digits of k
    assert {c for c, _ in per_commit} == {3}
    assert max(b for _, b in per_commit[1::2]) - min(b for _, b in per_commit[1::2]) <= 16
    assert max(b for _, b in per_commit[0::2]) - min(b for _, b in per_commit[0::2]) <= 16
    written.clear()
    assert st.finish(1000)   # the end writes the full manifest and errors.jsonl, once
    assert len(written) == 2
    st.close()
    s = rl.open_latents(tmp_path / "run")
    assert s.complete and len(s) == 500 and len(s.errors) == 500


def test_records_are_read_lazily(model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_rows(5000))
    spec = run_spec(data, shard_size=100, layers=(1,), model=str(model_dir))
    m = rl.Model(model_dir, device="cpu")
    driver = RunDriver(spec, run_config(spec, m), tmp_path / "run")
    m.close()
    read = {"n": 0}
    real = RunSpec.records

    def counted(self):
        for r in real(self):
            read["n"] += 1
            yield r
    monkeypatch.setattr(RunSpec, "records", counted)
    it = driver.pending()
    k, rng, recs = next(it)
    assert (k, rng, len(recs)) == (0, (0, 100), 100)
    # the early-stop check looks at the first 1000 records; then one shard at a time
    assert read["n"] <= rl_driver.EARLY_STOP_RECORDS + 100
    for _ in range(15):
        next(it)
    assert read["n"] <= 1700
    driver.close()


def test_duplicate_ids_by_exact_id_at_any_distance(tmp_path):
    rows = [{"id": f"x{i}", "steps": ["a"]} for i in range(20000)]
    rows += [{"id": "x3", "steps": ["b"]}, {"id": "x19999", "steps": ["c"]}, {"id": "x3", "steps": ["d"]}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = list(read_records(p))
    from rjepa_latent.inputs.data import ErrorRecord
    bad = [r for r in recs if isinstance(r, ErrorRecord)]
    assert [(r.line, r.reason) for r in bad] == [
        (20001, "duplicate id 'x3' (first seen at d.jsonl:4)"),
        (20002, "duplicate id 'x19999' (first seen at d.jsonl:20000)"),
        (20003, "duplicate id 'x3' (first seen at d.jsonl:4)")]
    ix = IdIndex()   # exact ids: ids that differ only in case, width or a trailing space are distinct
    for rid in ("a", "A", "a ", "ａ", "a\u0301", "á"):
        assert ix.add(rid, rid) is None
    assert ix.add("a ", "later") == "a "
    ix.close()

"""extract_dataset / `rjepa-latent extract` end to end with the real engine on
a tiny random llama: stored latents re-derived independently from HF
transformers over the stored spans; every bad-record kind lands in
errors.jsonl; dtypes; --part workers; refusal of clashing configurations;
a finished run is a no-op."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from rjepa_latent.store.files import bf16_from_f32
from test_tokenize import ADVERSARIAL

BAD_LINES = [
    '{"id": "broken", "steps": [',
    '{"id": "nosteps", "steps": "x"}',
    '{"id": "empty", "steps": []}',
    '{"id": "emptystep", "steps": ["a", ""]}',
    '{"id": "scripts", "steps": ["duplicate id"]}',
    json.dumps({"id": "too_long", "question": "Q", "steps": [" ".join(["word"] * 1200)]}),
    '{"what": 1}',
]
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return rl.Model(tiny_model_dir("llama"), device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in ADVERSARIAL]
    lines[3:3] = BAD_LINES[:4]
    lines += ["", BAD_LINES[4], BAD_LINES[5], BAD_LINES[6]]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_latents_match_hf_and_errors_are_kept(model, data, tmp_path, tiny_model_dir, hf_states):
    out = tmp_path / "run"
    s = rl.extract_dataset(data, model, out, layers=(1, -1), shard_size=4, max_batch_tokens=700, progress=False)
    assert s["complete"] and s["items"] == len(ADVERSARIAL) and s["errors"] == len(BAD_LINES)
    store = rl.open_latents(out)
    assert store.ids == [r["id"] for r in ADVERSARIAL]  # input order, whatever the batching
    errors = {e["id"]: e for e in store.errors}
    assert store.errors == [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in store.errors] == [4, 5, 6, 7, 15, 16, 17]
    assert "invalid JSON" in errors["broken"]["reason"] and "duplicate id 'scripts'" in errors["scripts"]["reason"]
    assert "more than --max-tokens 1024" in errors["too_long"]["reason"]
    assert "cannot tell the format" in errors[None]["reason"]

    tok = Tokenizer.from_file(str(tiny_model_dir("llama") / "tokenizer.json"))
    worst = 0.0
    for item in store:
        ids = tok.encode(item.meta["text"]).ids  # re-tokenize the stored text independently
        assert item.meta["num_tokens"] == len(ids) and item.meta["num_steps"] == len(item.token_spans)
        hs = hf_states(tiny_model_dir("llama"), ids)[[1, 3]]  # layers (1, -1) of a 3-layer model
        ref = np.stack([hs[:, a:b].mean(axis=1) for a, b in item.token_spans], axis=1)
        assert item.latents.shape == ref.shape and item.latents.dtype == np.float32
        worst = max(worst, float(np.abs(item.latents - ref).max() / np.abs(ref).max()))
    assert worst < 2e-5, worst


def test_dtypes_and_poolings(model, data, tmp_path):
    ref = tmp_path / "f32"
    rl.extract_dataset(data, model, ref, shard_size=5, progress=False, pooling="last")
    rl.extract_dataset(data, model, tmp_path / "f16", shard_size=5, progress=False, pooling="last", dtype="float16")
    rl.extract_dataset(data, model, tmp_path / "bf16", shard_size=5, progress=False, pooling="last", dtype="bfloat16")
    a, h, b = (rl.open_latents(tmp_path / n) for n in ("f32", "f16", "bf16"))
    for x, y, z in zip(a, h, b):
        assert y.latents.dtype == np.float16 and np.array_equal(y.latents, x.latents.astype(np.float16))
        assert np.array_equal(z.raw_latents, bf16_from_f32(x.latents)) and z.latents.dtype == ml_dtypes.bfloat16
        assert np.shares_memory(z.latents, z.raw_latents)   # zero-copy, never raw uint16 only
    with pytest.raises(ValueError, match="pooling"):
        rl.extract_dataset(data, model, tmp_path / "x", pooling="top", progress=False)
    with pytest.raises(ValueError, match="layer index 7 is out of range"):
        rl.extract_dataset(data, model, tmp_path / "x", layers=(7,), progress=False)
    assert not (tmp_path / "x").exists()


def test_noop_and_refusal_touch_nothing(model, data, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    rl.extract_dataset(data, model, out, shard_size=4, progress=False)
    before = snapshot(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t = time.perf_counter()
    s = rl.extract_dataset(data, model, out, shard_size=4, progress=False)
    assert s["noop"] and s["complete"] and time.perf_counter() - t < 5.0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(ValueError, match=f"{len(BAD_LINES)} records could not be processed"):
        rl.extract_dataset(data, model, out, shard_size=4, progress=False, strict=True)
    clashes = [
        (dict(dtype="float16"), "dtype"), (dict(layers=(1,)), "layers"), (dict(pooling="first"), "pooling"),
        (dict(template="Q: {question}\n{steps}"), "template"), (dict(max_tokens=500), "max_tokens"),
        (dict(shard_size=3), "shard_size"),
    ]
    for kw, key in clashes:
        with pytest.raises(rl.StoreError, match=rf"(?s)different configuration.*{key}: stored"):
            rl.extract_dataset(data, model, out, **{"shard_size": 4, **kw}, progress=False)
    other = rl.Model(tiny_model_dir("qwen2"), device="cpu")
    with pytest.raises(rl.StoreError, match="model_fingerprint: stored"):
        rl.extract_dataset(data, other, out, shard_size=4, progress=False)
    # appending grows the run (tests/test_grow.py); any other change of the data is refused
    changed = tmp_path / data.name
    changed.write_bytes(b'{"id": "new", "steps": ["n"]}\n' + data.read_bytes())
    with pytest.raises(rl.StoreError, match="(?s)over other data.*not an append"):
        rl.extract_dataset(changed, model, out, shard_size=4, progress=False)
    assert snapshot(out) == before


def _gsm8k_head(tmp_path: Path, n: int) -> Path:
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} is absent")
    p = tmp_path / "gsm8k_head.jsonl"
    with open(GSM8K, "rb") as f:
        p.write_bytes(b"".join(next(f) for _ in range(n)))
    return p


def test_parts_union_equals_single_run(model, data, tmp_path):
    single, parts = tmp_path / "single", tmp_path / "parts"
    rl.extract_dataset(data, model, single, shard_size=2, progress=False)
    for i in (2, 0, 1):
        s = rl.extract_dataset(data, model, parts, shard_size=2, part=f"{i}/3", progress=False)
        assert s["complete"] == (i == 1)  # the last worker to finish merges manifest.json
        if i == 2:  # a reader sees the finished shards of the workers so far
            part_ids = rl.open_latents(parts).ids
            assert not rl.open_latents(parts).complete and 0 < len(part_ids) < len(ADVERSARIAL)
    a, b = snapshot(single), snapshot(parts)
    # the journal replaced the per-part manifests: the whole directory is byte-identical
    # (shards, their journal entries, manifest.json and errors.jsonl)
    assert b == a
    assert rl.open_latents(parts).ids == rl.open_latents(single).ids


@pytest.mark.slow
def test_concurrent_part_processes(tmp_path, tiny_model_dir):
    src = _gsm8k_head(tmp_path, 40)
    args = [str(src), "--model", str(tiny_model_dir("llama")), "--shard-size", "4", "--layers=1",
            "--device", "cpu", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(rl.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-m", "rjepa_latent.cli", "extract", *args, "--out",
                               str(tmp_path / "parts"), "--part", f"{i}/2"], env=env) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert cli_main(["extract", *args, "--out", str(tmp_path / "single")]) == 0
    a, b = snapshot(tmp_path / "single"), snapshot(tmp_path / "parts")
    assert {k: b[k] for k in a} == a


def test_cli_strict_and_summary(data, tmp_path, tiny_model_dir, capsys):
    args = ["extract", str(data), "--model", str(tiny_model_dir("llama")), "--device", "cpu",
            "--no-progress", "--layers=-2", "--template", r"Question: {question}\nSteps:\n{steps}"]
    assert cli_main([*args, "--out", str(tmp_path / "a"), "--strict"]) == 1
    out = capsys.readouterr()
    assert f"{len(ADVERSARIAL)} items" in out.out and f"{len(BAD_LINES)} records could not" in out.err
    assert cli_main([*args, "--out", str(tmp_path / "b")]) == 0
    item = rl.open_latents(tmp_path / "b")["markers"]
    assert item.meta["text"].startswith("Question: Step 1: not a step\nSteps:\nStep 2: inside")


def test_records_the_engine_cannot_take_become_error_records(tmp_path, tiny_model_dir):
    """The seam (Model.check) refuses a record whose tokens are outside the model's
    vocabulary; it becomes an errors.jsonl line with the reason, the run goes on.
    A record longer than the model's sliding window is no error (the window is
    applied)."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("mistral"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens([f"qqq{i}" for i in range(30)])  # ids 300..329, past vocab_size=320
    tok.save(str(d / "tokenizer.json"))
    recs = [{"id": "ok", "steps": ["she sold 48"]}, {"id": "oov", "steps": ["a qqq25 b"]},
            {"id": "long", "steps": [" ".join(["clips"] * 20)]}]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = rl.extract_dataset(src, rl.Model(d, device="cpu"), tmp_path / "run", progress=False)
    store = rl.open_latents(tmp_path / "run")
    assert s["items"] == 2 and store.ids == ["ok", "long"]
    reasons = {e["id"]: e["reason"] for e in store.errors}
    assert "ids[3] = 325 is not a token id (vocab_size=320)" in reasons["oov"]
    assert "the tokenizer does not match the model" in reasons["oov"]
    assert set(reasons) == {"oov"}


def test_throughput_watch_warns_below_half_median():
    from rjepa_latent.run.local import ThroughputWarning, ThroughputWatch
    w = ThroughputWatch(budget=1000, min_batches=4)
    with pytest.warns(ThroughputWarning, match="memory pressure.*offloaded.*thermal") as rec:
        for _ in range(6):
            w.record(1000, 0.1)  # 10k tokens/s
        w.record(100, 1.0)       # a small tail batch: slow by nature, ignored
        w.record(1000, 0.15)     # 6.7k: not below half
        w.record(1000, 0.3)      # 3.3k: below half the median -> one warning
        w.record(1000, 0.3)      # rate-limited
    assert len(rec) == 1 and w.warnings == 1 and "batch 9 ran at 3,333 tokens/s" in str(rec[0].message)


def test_cli_ctrl_c_exits_130_and_resumes_byte_identical(data, tmp_path, tiny_model_dir, capsys, monkeypatch):
    from rjepa_latent.run import local as rl_local
    args = ["extract", str(data), "--model", str(tiny_model_dir("llama")), "--device", "cpu",
            "--no-progress", "--shard-size", "4"]
    assert cli_main([*args, "--out", str(tmp_path / "ref")]) == 0
    compute = rl_local._Runner._compute

    def interrupted(self, shard, bar, t0):
        if shard["index"] == 1:  # Ctrl-C while the engine runs shard 1
            raise KeyboardInterrupt
        return compute(self, shard, bar, t0)

    monkeypatch.setattr(rl_local._Runner, "_compute", interrupted)
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
    assert rl.open_latents(tmp_path / "run").shards[0]["index"] == 0  # the writer finished shard 0
    monkeypatch.setattr(rl_local._Runner, "_compute", compute)
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 0
    assert snapshot(tmp_path / "run") == snapshot(tmp_path / "ref")


def test_cli_unwritable_out_is_a_clear_error(data, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli_main(["extract", str(data), "--model", str(tiny_model_dir("llama")), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "afile" / "run")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Not a directory" in err and "Traceback" not in err


def test_non_utf8_input_file_name_is_a_clear_error(model, data, tmp_path):
    odd = tmp_path / os.fsdecode(b"d\xff.jsonl")
    odd.write_bytes(data.read_bytes())
    with pytest.raises(ValueError, match="is not valid UTF-8; rename the file"):
        rl.extract_dataset(odd, model, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused_before_the_model_loads(data, tmp_path, monkeypatch):
    from rjepa_latent.run import local as rl_local
    loads = []
    monkeypatch.setattr(rl_local, "_load_model", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(
        AssertionError("the model was loaded")))
    (tmp_path / "out").write_text("x")
    with pytest.raises(rl.StoreError, match="exists and is not a directory"):
        rl.extract_dataset(data, "/no/such/model", tmp_path / "out", progress=False)
    assert loads == []

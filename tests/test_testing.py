"""rjepa_latent.testing and its pytest plugin, as a downstream project uses them.

- `tiny_model` of every registered family loads in HF transformers and in
  `Model`, which match within 1e-5 (per layer max|ours-HF|/max|HF|, fp32 CPU,
  texts longer than Gemma's window); the GGUF file of the same arguments gives
  bitwise the HF directory's states and the same token ids; the same
  arguments give the same bytes, in another process too.
- `fake_run` passes `verify_run`, `info`, `rjepa-latent verify`, and reads
  through `open_latents`, `LatentDataset`, `StepPairs`; its texts, spans and
  token counts are the tokenizer's.
- Neither `import rjepa_latent.testing` nor the plugin imports torch or
  transformers (a subprocess where both are blocked builds models and runs).
- A fresh project outside the repository, with a test file that uses only the
  fixtures and rjepa_latent.testing, passes under pytest in a subprocess; a
  suite that uses nothing of the plugin is untouched by it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.store.files import verify_run
from rjepa_latent.testing import (assert_latents_close, fake_run, families, sample_records,
                                  tiny_model, write_records)

TOL = 1e-5
LENGTHS = (1, 9, 70)   # 70 > Gemma's window of 32: the window is exercised
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2")
WORST: dict[str, float] = {}


def _digest(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _max_rel(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    diff = np.abs(ours - ref).reshape(len(ref), -1).max(1)
    return diff / np.abs(ref).reshape(len(ref), -1).max(1)


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\ntiny_model vs HF transformers (fp32 CPU), worst max|ours-HF|/max|HF| per family:")
        for fam, err in sorted(WORST.items()):
            print(f"  {fam:12s} {err:.2e}")


def test_every_registered_family_is_covered():
    assert set(families()) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_matches_hf_and_its_gguf(tmp_path, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_dir = tiny_model(tmp_path / "hf", family=family, layers=3, seed=5)
    gguf_file = tiny_model(tmp_path / "g", family=family, layers=3, seed=5, format="gguf")
    assert gguf_file == tmp_path / "g" / "model.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    with rl.Model(hf_dir, device="cpu", threads=2) as m, \
            rl.Model(gguf_file, device="cpu", threads=2) as g:
        assert m.config["model_type"] == family and m.num_layers == 3 and m.hidden_size == 64
        assert g.config["model_type"] == ("llama" if family == "mistral" else family)
        worst = 0.0
        rng = np.random.default_rng(3)
        for n in LENGTHS:
            ids = rng.integers(0, m.config["vocab_size"], n)
            ours = m.hidden_states(ids)
            with torch.inference_mode():
                out = hf.model(torch.as_tensor(ids)[None], output_hidden_states=True)
            ref = torch.stack(out.hidden_states)[:, 0].float().numpy()
            assert np.abs(ref[1:]).mean() > 0.1   # real activations
            err = _max_rel(ours, ref)
            assert err.max() <= TOL, f"{family} T={n}: error per layer {err}"
            worst = max(worst, float(err.max()))
            np.testing.assert_array_equal(g.hidden_states(ids), ours)
        WORST[family] = worst
        text = "Step 1: 24 + 18 = 42 muffins.\nStep 2: The answer is 7. Ünïcödé 🤖"
        assert g.tokenizer.encode(text).ids == m.tokenizer.encode(text).ids
        assert m.tokenizer.encode(text).ids[0] == 0   # <s> first, as the post-processor says


def test_hf_loads_every_tensor_of_the_file(tmp_path):
    """HF reports no missing weight (a missing one would be randomly initialized)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for family in FAMILIES:
        d = tiny_model(tmp_path / family, family=family)
        _, info = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (family, info)
        assert not info["mismatched_keys"], (family, info)


def test_hf_tokenizer_of_the_directory_gives_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tiny_model(tmp_path / "m", family="llama")
    text = "Ana has 12 apples. Then Ana gets 3 more.\n12 + 3 = 15 apples."
    with rl.Model(d, device="cpu") as m:
        ours = m.tokenizer.encode(text).ids
    assert transformers.AutoTokenizer.from_pretrained(d)(text)["input_ids"] == ours


@pytest.mark.parametrize("fmt,dtype", [("hf", "bfloat16"), ("hf", "float16"),
                                       ("gguf", "float16"), ("gguf", "bfloat16"),
                                       ("gguf", "Q8_0")])
def test_stored_dtypes_load_and_stay_close(tmp_path, fmt, dtype):
    ref = tiny_model(tmp_path / "ref", family="qwen3")
    low = tiny_model(tmp_path / "low", family="qwen3", format=fmt, dtype=dtype)
    ids = np.arange(1, 40)
    with rl.Model(ref, device="cpu") as a, rl.Model(low, device="cpu") as b:
        x, y = a.hidden_states(ids), b.hidden_states(ids)
    assert not np.array_equal(x, y)          # the lower precision really reached the engine
    assert_latents_close(y, x, rtol=0.1, what=f"{fmt} {dtype}")


def test_same_arguments_same_bytes_in_another_process(tmp_path):
    here = {fmt: _digest(tiny_model(tmp_path / fmt, family="gemma2", format=fmt, seed=7))
            for fmt in ("hf", "gguf")}
    run = _digest(fake_run(tmp_path / "run", records=12, shard_size=5, seed=3))
    code = textwrap.dedent(f"""
        import hashlib, json, pathlib
        from rjepa_latent.testing import fake_run, tiny_model
        root = pathlib.Path({str(tmp_path / "other")!r})
        def digest(p):
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            return {{f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}}
        out = {{fmt: digest(tiny_model(root / fmt, family="gemma2", format=fmt, seed=7))
               for fmt in ("hf", "gguf")}}
        out["run"] = digest(fake_run(root / "run", records=12, shard_size=5, seed=3))
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    other = json.loads(res.stdout.strip().splitlines()[-1])
    assert other == {**here, "run": run}
    assert set(here["hf"]) == {"config.json", "model.safetensors", "tokenizer.json",
                               "tokenizer_config.json"}
    again = _digest(tiny_model(tmp_path / "seed8", family="gemma2", seed=8))
    assert again["model.safetensors"] != here["hf"]["model.safetensors"]
    assert again["tokenizer.json"] == here["hf"]["tokenizer.json"]


def test_tiny_model_options_and_refusals(tmp_path):
    p = tiny_model(tmp_path / "big", family="llama", hidden=96, layers=1, heads=6, kv_heads=3,
                   vocab=400)
    cfg = json.loads((p / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (96, 1, 6, 3, 400)
    with rl.Model(p, device="cpu") as m:
        assert m.tokenizer.get_vocab_size() == 400 and m.hidden_states([1, 399]).shape == (2, 2, 96)
    g = tiny_model(tmp_path / "named.gguf", family="qwen2", format="gguf")
    assert g == tmp_path / "named.gguf" and g.is_file()
    alias = tiny_model(tmp_path / "g3", family="gemma3")   # the GGUF architecture's name
    assert json.loads((alias / "config.json").read_text())["model_type"] == "gemma3_text"
    default = tiny_model()
    assert default.is_dir() and (default / "config.json").is_file()
    for kwargs, error in [({"family": "gpt2"}, "family must be one of"),
                          ({"format": "onnx"}, "format must be one of"),
                          ({"dtype": "Q4_0"}, "dtype must be one of"),
                          ({"hidden": 64, "heads": 3}, "even head size"),
                          ({"heads": 4, "kv_heads": 3}, "multiple of kv_heads"),
                          ({"vocab": 100}, "vocab must be an integer >= 258"),
                          ({"layers": 0}, "layers must be an integer >= 1")]:
        with pytest.raises(ValueError, match=error):
            tiny_model(tmp_path / "bad", **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        tiny_model(tmp_path / "file")


# ------------------------------------------------------------------ records and runs

def test_sample_records_read_as_their_formats():
    from rjepa_latent.inputs.data import Record, read_rows
    recs = sample_records(30, seed=1, steps=(2, 4))
    assert recs == sample_records(30, seed=1, steps=(2, 4)) != sample_records(30, seed=2, steps=(2, 4))
    assert [r["id"] for r in recs[:2]] == ["sample-00000", "sample-00001"]
    for k, fmt in enumerate(("cot", "gsm8k", "text")):
        rows = recs[k::3]   # record i is in format i % 3
        read = list(read_rows(rows, fmt))
        assert all(isinstance(r, Record) for r in read), read
        assert [len(r.steps) for r in read] == [r["difficulty"] for r in rows]
        assert all(2 <= r["difficulty"] <= 4 for r in rows)
    msgs = sample_records(2, formats=("messages",))
    assert msgs[0]["messages"][0]["role"] == "user"
    with pytest.raises(ValueError, match="formats must name"):
        sample_records(2, formats=("yaml",))
    with pytest.raises(ValueError, match="steps must be"):
        sample_records(2, steps=(3, 1))


def test_fake_run_passes_verify_info_and_the_readers(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from rjepa_latent import cli
    from rjepa_latent.store.info import inspect_run
    from rjepa_latent.testing import tokenizer
    from rjepa_latent.torch import LatentDataset, StepPairs
    run = fake_run(tmp_path / "run", records=23, layers=(-2, -1, 0), hidden=48, steps=(2, 5),
                   shard_size=10, num_layers=3, seed=4)
    assert verify_run(run) == {}
    info = inspect_run(run)
    assert info["complete"] and info["items"] == 23 and info["shards_total"] == 3
    assert cli.main(["verify", str(run)]) == 0 and cli.main(["info", str(run)]) == 0
    capsys.readouterr()
    st = rl.open_latents(run, verify=True)
    assert len(st) == 23 and st.config["layers"] == [2, 3, 0] and st.config["hidden_size"] == 48
    tok = tokenizer()
    for it in st:
        assert it.latents.shape == (3, it.meta["num_steps"], 48) and it.latents.dtype == np.float32
        assert 2 <= it.meta["num_steps"] <= 5 and it.meta["difficulty"] == it.meta["num_steps"]
        enc = tok.encode(it.meta["text"])
        assert len(enc.ids) == it.meta["num_tokens"]
        a, b = (int(x) for x in it.token_spans[0])
        assert 0 < a < b <= it.meta["num_tokens"]
    assert abs(float(np.std(st[0].latents)) - 1.0) < 0.3   # random N(0, 1) latents
    ds = LatentDataset(run, layer=-1)
    assert len(ds) == 23 and isinstance(ds[5]["latents"], torch.Tensor)
    np.testing.assert_array_equal(ds[5]["latents"].numpy(), st[5].latents[1])
    assert len(StepPairs(run)) == sum(it.meta["num_steps"] - 1 for it in st)


def test_fake_run_per_token_poolings_and_dtypes(tmp_path):
    tok = fake_run(tmp_path / "tok", records=6, per_token=True, dtype="bfloat16")
    st = rl.open_latents(tok, verify=True)
    assert st.per_token and st.config["pooling"] == "none"
    it = st[2]
    assert it.latents.shape == (1, it.meta["num_tokens"], 64) and str(it.latents.dtype) == "bfloat16"
    assert (it.token_steps >= -1).all() and it.token_steps.max() == it.meta["num_steps"] - 1
    multi = fake_run(tmp_path / "multi", records=5, poolings=("max", "mean", "first"),
                     dtype="float16")
    st = rl.open_latents(multi, verify=True)
    assert st.poolings == ["max", "mean", "first"]
    assert st[0].pooled("first").shape == st[0].latents.shape
    assert st[0].latents.dtype == np.float16
    assert verify_run(tok) == {} and verify_run(multi) == {}


def test_fake_run_refusals(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        fake_run(tmp_path / "full")
    with pytest.raises(ValueError, match="pooling"):
        fake_run(tmp_path / "a", poolings=("median",))
    with pytest.raises(rl.LayerError):
        fake_run(tmp_path / "b", layers=(5,), num_layers=2)
    with pytest.raises(ValueError, match="dtype"):
        fake_run(tmp_path / "c", dtype="int8")
    with pytest.raises(ValueError, match="records"):
        fake_run(tmp_path / "d", records=0)


def test_assert_latents_close_says_where():
    a = np.zeros((3, 4, 8), np.float32) + 1
    b = a.copy()
    assert_latents_close(a, b, rtol=0)
    b[1, 2, 5] += 0.5
    assert_latents_close(a, b, rtol=0.5)
    with pytest.raises(AssertionError) as e:
        assert_latents_close(a, b, rtol=1e-3, what="layer -2 of r7")
    msg = str(e.value)
    assert msg.startswith("layer -2 of r7: ") and "(1, 2, 5)" in msg and "1 of 3" in msg
    with pytest.raises(AssertionError, match=r"shapes differ: \(3, 4, 8\) vs \(4, 8\)"):
        assert_latents_close(a, b[0], rtol=1)
    c = a.copy()
    c[0, 0, 0] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
        assert_latents_close(c, a, rtol=1)
    import ml_dtypes
    assert_latents_close(a.astype(ml_dtypes.bfloat16), a, rtol=0)


# ------------------------------------------------------------------ without torch

def test_import_and_use_without_torch_or_transformers(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers"):
            sys.modules[name] = None          # any import of them raises ImportError
        import rjepa_latent.testing, rjepa_latent.testing.plugin
        from rjepa_latent.testing import fake_run, tiny_model
        import rjepa_latent as rl
        root = {str(tmp_path)!r}
        for fmt in ("hf", "gguf"):
            with rl.Model(tiny_model(root + "/" + fmt, family="olmo2", format=fmt), device="cpu") as m:
                assert m.hidden_states([0, 5, 7]).shape == (3, 3, 64)
        assert rl.open_latents(fake_run(root + "/run", records=5)).__len__() == 5
        print("OK", sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "transformers")
                           and sys.modules[k] is not None))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("OK []")


# ------------------------------------------------------------------ the plugin

DOWNSTREAM = '''
import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.testing import assert_latents_close, fake_run, sample_records, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "olmo2"])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_tiny_model_loads_and_runs(tmp_path, family, fmt):
    with rl.Model(tiny_model(tmp_path / "m", family=family, format=fmt), device="cpu") as m:
        states = m.hidden_states(np.arange(1, 30))
    assert states.shape == (3, 29, 64) and np.isfinite(states).all()


def test_fake_run_reads_everywhere(rjepa_fake_run):
    from rjepa_latent.store.files import verify_run
    from rjepa_latent.torch import LatentDataset
    assert verify_run(rjepa_fake_run) == {}
    store = rl.open_latents(rjepa_fake_run)
    ds = LatentDataset(rjepa_fake_run)
    assert len(store) == len(ds) == 100
    assert_latents_close(ds[7]["latents"].numpy(), store[7].latents[0], rtol=0)


def test_real_run_of_the_model(rjepa_run, rjepa_model):
    store = rl.open_latents(rjepa_run)
    assert len(store) == 24 and store.config["hidden_size"] == rjepa_model.hidden_size
    item = store[0]
    ids = rjepa_model.tokenizer.encode(item.meta["text"]).ids
    states = rjepa_model.hidden_states(ids, layers=[-2])
    a, b = (int(x) for x in item.token_spans[0])
    assert_latents_close(item.latents[0, 0], states[0, a:b].mean(0), rtol=1e-5, what="step 0")


def test_tiny_model_fixture(rjepa_tiny_model, rjepa_model):
    assert (rjepa_tiny_model / "config.json").is_file()
    assert rjepa_model.device == "cpu"


@pytest.mark.rjepa_gpu
def test_on_a_gpu(rjepa_device, rjepa_tiny_model):
    with rl.Model(rjepa_tiny_model, device=rjepa_device) as m:
        assert m.hidden_states([1, 2, 3]).shape[1] == 3
'''


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           *args], cwd=project, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture
def project(tmp_path) -> Path:
    """A fresh downstream project outside the repository."""
    root = tmp_path / "downstream"
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'downstream'\nversion = '0'\n")
    return root


def test_a_downstream_project_uses_the_fixtures(project):
    pytest.importorskip("torch")   # the file uses rjepa_latent.torch.LatentDataset
    (project / "tests" / "test_downstream.py").write_text(DOWNSTREAM)
    res = _pytest(project)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    has_gpu = rl.build_info()["cuda"] and rl._native._core.cuda_device_count() > 0
    assert ("11 passed, 1 skipped" if not has_gpu else "12 passed") in out, out
    if not has_gpu:
        assert "rjepa_gpu: " in out   # the skip says why


def test_the_example_of_docs_testing_md_passes(project):
    """The complete example test file of docs/testing.md, as a downstream project runs it."""
    pytest.importorskip("torch")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    code = doc.split("```python\n")[-1].split("```")[0]
    assert "def test_" in code and "rjepa_fake_run" in code
    (project / "tests" / "test_with_rjepa.py").write_text(code)
    res = _pytest(project)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    has_gpu = rl.build_info()["cuda"] and rl._native._core.cuda_device_count() > 0
    assert ("14 passed, 1 skipped" if not has_gpu else "15 passed") in out, out


def test_rjepa_model_option_runs_the_fixtures_on_another_checkpoint(project, tmp_path):
    other = tiny_model(tmp_path / "other.gguf", family="gemma3_text", hidden=32, heads=2,
                       kv_heads=1, format="gguf")
    (project / "tests" / "test_opt.py").write_text(textwrap.dedent('''
        import rjepa_latent as rl
        def test_model(rjepa_model, rjepa_run):
            assert rjepa_model.config["model_type"] == "gemma3_text"
            assert rjepa_model.hidden_size == 32
            assert rl.open_latents(rjepa_run).config["hidden_size"] == 32
    '''))
    res = _pytest(project, "--rjepa-model", str(other))
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout + res.stderr
    res = _pytest(project, "--rjepa-model", str(tmp_path / "missing"))
    assert res.returncode == 4 and "--rjepa-model" in res.stderr + res.stdout


def test_the_plugin_adds_only_rjepa_names_and_leaves_other_suites_alone(project):
    (project / "tests" / "test_plain.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    res = _pytest(project)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout + res.stderr
    fixtures = _pytest(project, "--fixtures").stdout
    ours = _pytest(project, "--fixtures", "-p", "no:rjepa_latent").stdout

    def names(text):   # "name [session scope] -- file:line" or "name -- file:line"
        return {line.split()[0] for line in text.splitlines()
                if " -- " in line and not line.startswith((" ", "-", "="))}
    added = names(fixtures) - names(ours)
    assert added == {"rjepa_tiny_model", "rjepa_model", "rjepa_run", "rjepa_fake_run",
                     "rjepa_device"}, added
    markers = _pytest(project, "--markers").stdout
    assert "@pytest.mark.rjepa_gpu" in markers
    assert "--rjepa-model" in _pytest(project, "--help").stdout

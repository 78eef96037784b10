"""`rjepa-latent parity` / `rl.check_parity`: the user-facing parity check.

It must pass on the tiny model of every family and on the default GGUF model,
report the same worst errors as an independent computation (HF states from
conftest, our states from the public API), and fail, naming the layer, when
the reference and the engine really differ."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.tools import parity
from conftest import ARCHS, hf_hidden_states

RECORDS = [
    {"id": "a", "question": "Tom has 3 apples and buys 4 more. How many?",
     "steps": ["He has 3 + 4 = 7 apples.", "The answer is 7."]},
    {"id": "b", "question": "A box holds 12 eggs. How many in 5 boxes?",
     "steps": ["5 boxes hold 5 * 12 = 60 eggs.", "So there are 60 eggs.", "The answer is 60."]},
    {"id": "c", "steps": ["Only one step here, with no question at all."]},
]


def _independent(model_dir, layers, pooling="mean"):
    """Worst per-layer relative errors computed without parity.py."""
    from rjepa_latent.inputs.data import Template
    m = rl.Model(model_dir, device="cpu")
    tmpl = Template()
    hid, pool = [], []
    for r in RECORDS:
        text, steps = tmpl.render(r.get("question"), r["steps"])
        enc = m.tokenizer.encode(text)
        ids = np.array(enc.ids, np.int32)
        spans = parity.independent_spans(np.array(enc.offsets).reshape(-1, 2), steps)
        ours = m.hidden_states(ids, layers=layers)
        ref = hf_hidden_states(model_dir, ids)[layers]
        lat = m.extract([ids], [spans], layers=layers, pooling=pooling)[0]
        ref_lat = np.stack([ref[:, s:e].astype(np.float64).mean(1) for s, e in spans], 1)
        rel = lambda a, b: (np.linalg.norm((a - b).reshape(len(b), -1), axis=1)
                            / np.linalg.norm(b.reshape(len(b), -1), axis=1))
        hid.append(rel(ours.astype(np.float64), ref.astype(np.float64)))
        pool.append(rel(lat.astype(np.float64), ref_lat))
    m.close()
    return np.max(hid, 0), np.max(pool, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_passes_and_errors_agree_with_independent_computation(arch, tiny_model_dir):
    d = tiny_model_dir(arch)
    res = rl.check_parity(d, device="cpu", texts=RECORDS)
    assert res.passed, res.table()
    assert [lp.layer for lp in res.layers] == [0, 1, 2, 3]
    assert res.batch_invariance["passed"] and res.batch_invariance["max_abs_diff"] == 0.0
    assert res.spans["passed"] and res.spans["checked"] == 6
    hid, pool = _independent(d, [0, 1, 2, 3])
    got_h = np.array([lp.worst_rel_err for lp in res.layers])
    got_p = np.array([lp.pooled_rel_err for lp in res.layers])
    np.testing.assert_allclose(got_h, hid, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got_p, pool, rtol=1e-6, atol=1e-12)
    assert got_h[1:].min() > 0            # a real comparison, not identical code paths
    assert all(lp.bound == parity.CPU_BOUND for lp in res.layers)


def _perturb_layer1(monkeypatch):
    real = parity.load_reference

    def altered(*a, **kw):
        model = real(*a, **kw)
        import torch
        with torch.no_grad():   # weights altered after HF loaded them
            model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
        return model
    monkeypatch.setattr(parity, "load_reference", altered)


def test_wrong_reference_fails_naming_the_layer(tiny_model_dir, monkeypatch):
    _perturb_layer1(monkeypatch)
    res = rl.check_parity(tiny_model_dir("llama"), texts=RECORDS)
    assert not res.passed
    assert res.failed_layers == [2, 3]    # layer index 2 = output of decoder layer 1
    assert res.layers[1].passed and res.layers[0].passed
    assert "FAILED at layer 2, 3" in res.table()


def test_cli_exit_status_and_json(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from rjepa_latent.cli import main
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    out = tmp_path / "p.json"
    d = str(tiny_model_dir("qwen2"))
    assert main(["parity", "--model", d, "--data", str(data), "--texts", "2",
                 "--layers", "-2,-1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "only were loaded" not in text   # -1: all loaded
    j = json.loads(out.read_text())
    assert j["passed"] is True and j["texts"] == 2
    assert [(r["layer"], r["passed"]) for r in j["layers"]] == [(2, True), (3, True)]
    assert all({"layer", "worst_rel_err", "bound", "passed"} <= set(r) for r in j["layers"])
    _perturb_layer1(monkeypatch)
    assert main(["parity", "--model", d, "--data", str(data), "--json", str(out)]) == 1
    assert "FAILED at layer 2" in capsys.readouterr().out
    assert json.loads(out.read_text())["passed"] is False


def test_shallow_layers_load_fewer_hf_layers(tiny_model_dir):
    res = rl.check_parity(tiny_model_dir("mistral"), texts=RECORDS, layers=[1])
    assert res.passed and [lp.layer for lp in res.layers] == [1]
    assert any("decoder layers 0..1 only were loaded in HF, 0..0 in this engine" in n for n in res.notes)


def test_broken_span_rule_is_caught(tiny_model_dir, monkeypatch):
    from rjepa_latent.inputs import tokenize
    real = tokenize.step_spans

    def shifted(offsets, steps):
        spans, missing = real(offsets, steps)
        spans = spans.copy()
        spans[:, 0] += 1      # drops each step's first token
        return spans, missing
    monkeypatch.setattr(tokenize, "step_spans", shifted)
    res = rl.check_parity(tiny_model_dir("llama"), texts=RECORDS)
    assert not res.spans["passed"] and not res.passed
    assert "span rule" in res.spans["problems"][0]


def test_string_texts_and_bad_arguments(tiny_model_dir):
    d = tiny_model_dir("llama")
    res = rl.check_parity(d, texts=["one single step of text", "another text"])
    assert res.passed and res.texts == 2 and res.spans["checked"] == 2
    with pytest.raises(ValueError, match="empty"):
        rl.check_parity(d, texts=["  "])
    with pytest.raises(TypeError, match="all strings"):
        rl.check_parity(d, texts=["x", 3])
    with pytest.raises(ValueError, match="out of range"):
        rl.check_parity(d, texts=RECORDS, layers=[9])


def test_missing_torch_is_an_install_hint(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install"):
        rl.check_parity(tiny_model_dir("llama"), texts=RECORDS)
    from rjepa_latent.cli import main
    assert main(["parity", "--model", str(tiny_model_dir("llama"))]) == 2
    assert "pip install" in capsys.readouterr().err


def test_default_gguf_model_passes(capsys, tmp_path):
    from rjepa_latent.cli import main
    out = tmp_path / "p.json"
    assert main(["parity", "--texts", "3", "--json", str(out)]) == 0
    j = json.loads(out.read_text())
    assert j["passed"] and len(j["layers"]) == 31 and j["model"].endswith(".gguf")
    assert max(r["worst_rel_err"] for r in j["layers"]) < parity.GGUF_BOUND


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_parity_passes(tiny_model_dir, dtype):
    """On a GPU: the bf16 engine within 1.1x HF's own bf16 error, fp32 within 1e-4."""
    if rl._native._core.cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    pytest.importorskip("torch")
    res = rl.check_parity(tiny_model_dir("qwen3"), device="cuda", dtype=dtype, texts=RECORDS)
    assert res.passed, res.table()
    if dtype == "bfloat16":
        assert all(lp.hf_bf16_rel_err is not None and lp.bound > 0 for lp in res.layers)
    else:
        assert all(lp.bound == parity.CUDA_FP32_BOUND for lp in res.layers)


@pytest.mark.parametrize("family,qtype", [("qwen3", "Q8_0"), ("qwen2", "Q4_1")])
def test_qwen_gguf_files(family, qtype, tmp_path):
    """Qwen3 with head_dim != hidden/heads: transformers' GGUF loader refuses
    the file, so the reference is transformers' model on our dequantized
    weights (said in the notes); Qwen2: transformers reads the file itself."""
    pytest.importorskip("gguf")
    from test_gguf import FAMILY_CASES, _family_hf_model, _vocab, write_family_gguf
    model = _family_hf_model(family, len(_vocab()[0]), seed=5)
    path = tmp_path / "m.gguf"
    write_family_gguf(model, path, FAMILY_CASES[family], qtype, pre="qwen2")
    res = rl.check_parity(path, texts=RECORDS)
    assert res.passed, res.table()
    fallback = any("transformers cannot read this GGUF file" in n for n in res.notes)
    assert fallback == (family == "qwen3")
    assert max(lp.worst_rel_err for lp in res.layers[1:]) > 0

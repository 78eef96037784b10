"""The Model API: device contract, memory plan/report, argument validation
(each bad argument raises ValueError/TypeError naming it and the value; the
class per kind of mistake is tested in test_seam_batches.py), batching under
max_batch_tokens, zero-copy results, no leak over many calls."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import _core
from conftest import VOCAB

NO_CUDA = _core.cuda_device_count() == 0


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return rl.Model(tiny_model_dir("llama"), device="cpu", threads=2)


def seq(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


# -- device contract ---------------------------------------------------------

@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_request_without_cuda_raises_with_reason(tiny_model_dir, device):
    with pytest.raises(rl.DeviceError) as e:
        rl.Model(tiny_model_dir("llama"), device=device)
    msg = str(e.value).lower()
    assert "cuda" in msg and any(w in msg for w in ("not built", "not compiled", "driver",
                                                    "no cuda", "no device", "out of range"))


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_default_device_is_cpu_without_a_notice(tiny_model_dir, capsys, monkeypatch):
    """Nothing on stderr and no Python warning: `m.device` tells."""
    from rjepa_latent.engine import model as model_mod
    monkeypatch.setattr(model_mod, "_cpu_notice_shown", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = rl.Model(tiny_model_dir("llama"))
        rl.Model(tiny_model_dir("llama"))
    assert m.device == "cpu"
    assert [str(w.message) for w in caught] == []
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "CPU", 0])
def test_unknown_device_is_value_error(tiny_model_dir, device):
    with pytest.raises(ValueError, match=repr(device).replace("'", "'?")):
        rl.Model(tiny_model_dir("llama"), device=device)


# -- memory plan and report ----------------------------------------------------

def _fp32_bytes(cfg: dict, layers: int, final_norm: bool) -> int:
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_heads"] * hd, cfg["num_kv_heads"] * hd
    per_layer = 2 * d + q * d + 2 * kv * d + d * q + 3 * ff * d
    # + the RoPE inverse frequencies [hd/2], a loaded tensor too
    return 4 * (cfg["vocab_size"] * d + layers * per_layer + (d if final_norm else 0) + hd // 2)


def test_memory_plan_cpu_without_loading(tiny_model_dir, tmp_path):
    d = tmp_path / "config_only"
    d.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", d)  # no weights at all
    cfg = json.loads((d / "config.json").read_text())
    full = rl.memory_plan(d, device="cpu", max_batch_tokens=512)
    part = rl.memory_plan(d, device="cpu", max_batch_tokens=512, layers=[-3])
    pub = rl.Model(tiny_model_dir("llama"), device="cpu").config
    for plan, n, norm in ((full, 3, True), (part, 1, False)):
        exact = _fp32_bytes(pub, n, norm)
        assert plan["weight_bytes"] == exact
        assert plan["total_bytes"] == plan["weight_bytes"] + plan["workspace_bytes"]
        assert plan["workspace_bytes"] >= 512 * cfg["hidden_size"] * 4
    bigger = rl.memory_plan(d, device="cpu", max_batch_tokens=2048)
    assert bigger["workspace_bytes"] > full["workspace_bytes"]
    assert bigger["weight_bytes"] == full["weight_bytes"]


def test_memory_report_matches_plan(tiny_model_dir):
    for max_layer, layers in ((None, None), (1, [1])):
        m = rl.Model(tiny_model_dir("qwen2"), device="cpu", max_layer=max_layer,
                     max_batch_tokens=300)
        rep = m.memory_report()
        plan = rl.memory_plan(tiny_model_dir("qwen2"), device="cpu", max_batch_tokens=300,
                              layers=layers)
        assert rep["device"] == "cpu"
        assert rep["weight_bytes"] == plan["weight_bytes"]
        assert rep["workspace_bytes"] == plan["workspace_bytes"]


# -- attributes, results ----------------------------------------------------------

def test_attributes_and_tokenizer(llama):
    from tokenizers import Tokenizer
    c = llama.config
    assert (c["model_type"], c["hidden_size"], c["num_layers"], c["num_heads"],
            c["num_kv_heads"], c["head_dim"], c["vocab_size"]) == ("llama", 64, 3, 4, 2, 16, 320)
    assert llama.device == "cpu" and llama.num_layers == 3 and llama.hidden_size == 64
    assert isinstance(llama.tokenizer, Tokenizer) and len(llama.fingerprint) == 64
    ids = llama.tokenizer.encode("Step 1: she sold 48 clips.").ids
    out = llama.extract([ids])
    assert len(out) == 1 and out[0].shape == (1, 1, 64) and out[0].dtype == np.float32


def test_results_are_zero_copy_views_of_core_memory(llama):
    outs = llama.extract([seq(10), seq(20, 1)], layers=(1, -1), pooling="none")
    for a in outs:
        assert not a.flags.owndata and a.base is not None
    assert outs[0].base is outs[1].base  # both are views of one batch result
    single = llama.hidden_states(seq(5))
    assert not single.flags.owndata and single.flags.c_contiguous
    assert not np.shares_memory(single, llama.hidden_states(seq(5)))  # never scratch


def test_long_sequence_runs_on_cpu_and_leaves_the_workspace(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cpu", max_batch_tokens=32)
    seqs = [seq(10), seq(100, 1), seq(20, 2)]
    out = m.extract(seqs, layers=(-2,), pooling="mean")
    ref = rl.Model(tiny_model_dir("llama"), device="cpu").extract(seqs, layers=(-2,))
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)
    # grown for the call only: the Model is as it was loaded
    assert m.max_batch_tokens == m.workspace_tokens == 32
    assert m.memory_report()["workspace_bytes"] == rl.memory_plan(
        tiny_model_dir("llama"), device="cpu", max_batch_tokens=32)["workspace_bytes"]


def test_many_spans_more_than_tokens(llama):
    ids = seq(3)
    spans = np.array([[0, 3]] * 50)  # overlapping spans: S > T
    out = llama.extract([ids, ids], [spans, spans[:2]], max_batch_tokens=40)
    assert out[0].shape == (1, 50, 64) and out[1].shape == (1, 2, 64)
    np.testing.assert_array_equal(out[0][:, 0], out[1][:, 1])


def test_empty_list_and_context_manager(tiny_model_dir):
    with rl.Model(tiny_model_dir("llama"), device="cpu") as m:
        assert m.extract([]) == []
        kept = m.hidden_states([1, 2, 3])
    with pytest.raises(RuntimeError, match="closed"):
        m.extract([[1, 2]])
    assert np.isfinite(kept).all()  # results outlive the model


def test_no_leak_over_many_calls(tiny_model_dir):
    import resource
    # one thread: a tiny model gains nothing from more, and stays fast on a busy machine
    llama = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    seqs = [seq(64, i) for i in range(8)]

    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    for _ in range(20):
        llama.extract(seqs, pooling="none", layers=(0, 1, 2, 3))
    before = rss_kb()
    for _ in range(200):  # 200 x 8 x [4, 64, 64] f32 = 420 MB if results leaked
        llama.extract(seqs, pooling="none", layers=(0, 1, 2, 3))
    assert rss_kb() - before < 30_000


# -- bad arguments ----------------------------------------------------------------

@pytest.mark.parametrize("seqs,exc,match", [
    ([[1, 2, VOCAB]], ValueError, rf"seqs\[0\]\[2\] = {VOCAB} .*vocab_size={VOCAB}"),
    ([[1, 2], [5, -1, 3]], ValueError, r"seqs\[1\]\[1\] = -1"),
    ([[1.0, 2.0]], TypeError, r"seqs\[0\].*integer.*float64"),
    ([np.array([1, 2], np.float32)], TypeError, r"seqs\[0\].*float32"),
    ([[1, 2], []], ValueError, r"seqs\[1\] is empty"),
    ([np.zeros((2, 3), int)], ValueError, r"seqs\[0\] must be 1-D"),
    ([["a", "b"]], TypeError, r"seqs\[0\]"),
    (np.array([1, 2, 3]), TypeError, r"list of sequences"),
])
def test_bad_ids(llama, seqs, exc, match):
    with pytest.raises(exc, match=match):
        llama.extract(seqs)


@pytest.mark.parametrize("spans,match", [
    ([[[0, 11]]], r"spans\[0\]\[0\] = \[0, 11\) is out of range .*10 tokens"),
    ([[[0, 4], [-1, 2]]], r"spans\[0\]\[1\] = \[-1, 2\) is out of range"),
    ([[[3, 3]]], r"spans\[0\]\[0\] = \[3, 3\) is empty"),
    ([[[5, 2]]], r"spans\[0\]\[0\] = \[5, 2\) is reversed"),
    ([[[0, 2]], [[0, 1]]], r"spans has 2 entries but seqs has 1"),
    ([np.zeros((0, 2), int)], r"spans\[0\] holds no span"),
    ([[[0, 1, 2]]], r"spans\[0\] must have shape \[n, 2\]"),
])
def test_bad_spans(llama, spans, match):
    with pytest.raises(ValueError, match=match):
        llama.extract([seq(10)], spans)


def test_hidden_states_names_ids(llama):
    with pytest.raises(ValueError, match=r"ids\[1\] = 999"):
        llama.hidden_states([1, 999])
    with pytest.raises(TypeError, match=r"^ids must hold integer"):
        llama.hidden_states([0.5])


def test_float_spans_are_type_error(llama):
    with pytest.raises(TypeError, match=r"spans\[0\].*float64"):
        llama.extract([seq(10)], [np.array([[0.0, 2.0]])])


@pytest.mark.parametrize("layers,match", [
    ((4,), r"layer index 4 is out of range.*-4\.\.3"),
    ((-5,), r"layer index -5 is out of range"),
    ((), r"layers is empty"),
])
def test_bad_layers(llama, layers, match):
    with pytest.raises(ValueError, match=match):
        llama.extract([seq(5)], layers=layers)
    with pytest.raises(TypeError, match="layers must be ints"):
        llama.extract([seq(5)], layers=(1.5,))


def test_bad_pooling_and_budget(llama):
    with pytest.raises(ValueError, match=r"pooling must be one of mean, first, last, max, none.*'top'"):
        llama.extract([seq(5)], pooling="top")
    with pytest.raises(ValueError, match=r"pooling must be one of .*'top'"):
        llama.extract([seq(5)], pooling=("mean", "top"))
    with pytest.raises(ValueError, match=r"pooling lists 'max' more than once"):
        llama.extract([seq(5)], pooling=("max", "mean", "max"))
    with pytest.raises(ValueError, match=r"pooling 'none' \(every token\) cannot be combined"):
        llama.extract([seq(5)], pooling=("none", "mean"))
    with pytest.raises(ValueError, match=r"pooling is empty"):
        llama.extract([seq(5)], pooling=())
    with pytest.raises(TypeError, match=r"pooling must be a str or a list / tuple of str"):
        llama.extract([seq(5)], pooling={"mean"})
    with pytest.raises(ValueError, match=r"spans must be None with pooling='none'"):
        llama.extract([seq(5)], [[[0, 2]]], pooling="none")
    with pytest.raises(ValueError, match=r"max_batch_tokens must be a positive int, got 0"):
        llama.extract([seq(5)], max_batch_tokens=0)


def test_bad_max_layer(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_layer=4 is out of range"):
        rl.Model(tiny_model_dir("llama"), device="cpu", max_layer=4)
    with pytest.raises(TypeError, match=r"max_layer must be an int"):
        rl.Model(tiny_model_dir("llama"), device="cpu", max_layer="2")


def test_sliding_window_applies_to_longer_sequences(tiny_model_dir, tmp_path):
    """A window of 16: longer sequences run (no refusal); positions inside the
    window see what full attention sees, later ones less."""
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("mistral"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    m, full = rl.Model(d, device="cpu"), rl.Model(tiny_model_dir("mistral"), device="cpu")
    assert m.extract([seq(16), seq(17)])[1].shape == (1, 1, 64)
    w, f = m.hidden_states(seq(40)), full.hidden_states(seq(40))
    np.testing.assert_array_equal(w[:, :16], f[:, :16])
    assert not np.allclose(w[1:, 16:], f[1:, 16:])


# -- the benchmark subcommand cannot rot ------------------------------------------------

def test_bench_tiny_smoke(tmp_path, capsys):
    from rjepa_latent.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["engine_tokens_per_s"] > 0 and res["hf_tokens_per_s"] > 0
    assert res["max_rel_err_vs_hf"] < 1e-5  # same latents as HF on the same texts
    assert "speedup vs HF" in capsys.readouterr().out


@pytest.mark.parametrize("opt", ["--repeats", "--n-seqs", "--max-batch-tokens", "--hf-batch", "--threads"])
def test_bench_refuses_non_positive_counts(opt, capsys):
    from rjepa_latent.cli import main
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2, before any work
        main(["bench", "--tiny", opt, "0"])
    assert e.value.code == 2 and f"{opt}: expected a positive integer, got 0" in capsys.readouterr().err


def test_device_memory_error_names_needed_free_and_what_to_lower():
    from rjepa_latent.engine.model import _check_fits
    plan = {"device": "cuda:0", "max_batch_tokens": 65536, "max_layer": 28,
            "weight_bytes": 15 * 2**30, "workspace_bytes": 6 * 2**30,
            "total_bytes": 21 * 2**30, "free_bytes": 20 * 2**30, "total_device_bytes": 24 * 2**30}
    with pytest.raises(rl.DeviceMemoryError) as e:
        _check_fits(plan)
    msg = str(e.value)
    assert "21.50 GiB" in msg and "20.00 GiB of 24.00 GiB is free" in msg
    assert "max_batch_tokens" in msg and "max_layer" in msg
    plan["free_bytes"] = 22 * 2**30
    _check_fits(plan)  # fits with the headroom: no error

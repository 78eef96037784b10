"""Result ownership: a result array owns only its own allocation, so
`Model.close()` returns the model's memory while results stay alive."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rjepa_latent as rl


RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys, numpy as np, rjepa_latent as rl
    from rjepa_latent.default_model import default_model_path
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    gc.collect()
    before = rss()
    m = rl.Model(default_model_path(), device="cpu", weights=sys.argv[1])
    model_bytes = m.memory_report()["weight_bytes"]  # the workspace is mostly untouched pages
    ids = np.arange(1, 64, dtype=np.int32)
    kept = [m.hidden_states(ids, layers=[0, -1]), m.extract([ids], [[[0, 10], [10, 63]]])[0]]
    loaded = rss()
    copy = [k.copy() for k in kept]
    m.close()
    gc.collect()
    closed = rss()
    same = all(np.array_equal(a, b) for a, b in zip(kept, copy))
    print(json.dumps({"before": before, "loaded": loaded, "closed": closed,
                      "model_bytes": model_bytes, "results_intact": same}))
""")


@pytest.mark.parametrize("weights", ["dequantize", "keep"])
def test_close_returns_model_memory_while_results_live(weights):
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, weights], capture_output=True, text=True,
                         timeout=300, check=True)
    import json
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["results_intact"]
    taken = r["loaded"] - r["before"]
    freed = r["loaded"] - r["closed"]
    assert taken >= 0.9 * r["model_bytes"], r   # the load really took the model's memory
    # all of the weights (kept quantized: their stored bytes and the scratch) come back;
    # what a Model keeps besides (its tokenizer) is small beside dense weights
    assert freed >= 0.9 * r["model_bytes"], r
    if weights == "dequantize":
        assert freed >= 0.9 * taken, (f"close() returned {freed / 2**20:.0f} MiB of the "
                                      f"{taken / 2**20:.0f} MiB the model took", r)


def test_closed_model_raises_and_results_stay_valid(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cpu")
    ids = np.arange(1, 20, dtype=np.int32)
    h = m.hidden_states(ids, layers=[-1])
    ref = h.copy()
    with m:
        pass                       # the context manager closes too
    np.testing.assert_array_equal(h, ref)
    with pytest.raises(RuntimeError, match="closed"):
        m.extract([ids])
    with pytest.raises(RuntimeError, match="closed"):
        m.memory_report()
    m.close()                      # closing twice is harmless


def test_engine_close_is_checked_in_core(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cpu")
    eng = m._engine
    ids = np.arange(1, 8, dtype=np.int32)
    res = eng.forward(ids, np.array([0, 7], np.int32), np.array([1], np.int32),
                      np.array([[0, 7]], np.int32), np.array([0], np.int32), "mean")
    eng.close()
    assert res.base is not None and res.shape == (1, 1, m.hidden_size)
    assert np.isfinite(res).all()
    with pytest.raises(RuntimeError, match="closed"):
        eng.forward(ids, np.array([0, 7], np.int32), np.array([1], np.int32),
                    np.array([[0, 7]], np.int32), np.array([0], np.int32), "mean")
    with pytest.raises(RuntimeError, match="closed"):
        _ = eng.kernel


def test_tensor_layout_follows_the_final_norm_and_loaded_layer_rules():
    cfg = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_layers": 3,
           "num_heads": 2, "num_kv_heads": 1, "head_dim": 4, "rms_norm_eps": 1e-6}
    full = rl._native._core.tensor_layout({**cfg, "max_layer": 3})
    part = rl._native._core.tensor_layout({**cfg, "max_layer": 2})
    assert ("final_norm", 0, (8,)) in full and all(k != "final_norm" for k, _, _ in part)
    assert max(l for k, l, _ in full if k == "q") == 2
    assert max(l for k, l, _ in part if k == "q") == 1          # layer 2 is never run
    assert ("k", 0, (4, 8)) in full and all(k != "q_bias" for k, _, _ in full)
    biased = rl._native._core.tensor_layout({**cfg, "max_layer": 1, "attn_qkv_bias": 1,
                                             "qk_norm": 1})
    assert ("q_bias", 0, (8,)) in biased and ("k_norm", 0, (4,)) in biased


RACE_SCRIPT = textwrap.dedent("""
    import sys, threading, numpy as np, rjepa_latent as rl
    sys.path.insert(0, "tests")
    from conftest import build_tiny_model
    import pathlib, tempfile
    d = build_tiny_model("llama", pathlib.Path(tempfile.mkdtemp()) / "m")
    ids = np.arange(1, 40, dtype=np.int32)
    for round in range(20):
        m = rl.Model(d, device="cpu", threads=1)
        eng = m._engine
        stop = False
        def hammer():
            while not stop:
                for call in (eng.memory_report, lambda: eng.max_tokens, lambda: eng.kernel,
                             lambda: eng.weight_bytes, lambda: eng.caps,
                             lambda: eng.tensor_shape("q", 0), lambda: m.hidden_states(ids, [1])):
                    try:
                        call()
                    except RuntimeError as e:
                        assert "closed" in str(e), e
        ts = [threading.Thread(target=hammer) for _ in range(3)]
        for t in ts:
            t.start()
        m.close()
        stop = True
        for t in ts:
            t.join()
        try:
            eng.__init__({"vocab_size": 8}, "cpu")
            raise SystemExit("a closed Engine was initialized again")
        except RuntimeError as e:
            assert "closed" in str(e)
    print("ok")
""")


def test_close_racing_other_threads_never_crashes():
    """close() while other threads call the engine's methods and getters: each
    call either works or says the engine is closed (a segfault fails the run)."""
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", RACE_SCRIPT], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-2000:])

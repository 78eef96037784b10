"""The one batch seam: plan.plan_batches is the only packer (cost max(tokens,
spans)); Model.extract and the pipeline call the engine with exactly the planned
batches; each kind of bad input has its own exception class; a call never
changes the caller's Model (the CPU workspace grows for the call only)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import errors
from rjepa_latent.engine.plan import batch_cost, plan_batches
from conftest import VOCAB


class RecordingEngine:
    """Wraps the real engine and records every forward call: sequence lengths,
    span count, and the workspace capacity at the time of the call."""

    def __init__(self, engine):
        self._engine = engine
        self.calls: list[tuple[list[int], int, int]] = []

    def forward(self, tokens, cu, layers, spans, span_seq, pooling):
        self.calls.append((np.diff(cu).tolist(), int(len(spans)), int(self._engine.max_tokens)))
        return self._engine.forward(tokens, cu, layers, spans, span_seq, pooling)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def seq(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def state(m: rl.Model) -> tuple:
    rep = m.memory_report()
    return m.max_batch_tokens, m.workspace_tokens, rep["weight_bytes"], rep["workspace_bytes"]


# -- the packer -------------------------------------------------------------------

def test_one_cost_rule_counts_spans_and_tokens():
    assert batch_cost(10, 3) == 10 and batch_cost(3, 50) == 50
    # spans push a batch over the budget exactly as tokens do
    assert plan_batches([3, 3, 3], 10, spans=[50, 2, 2], longest_first=False) == [[0], [1, 2]]
    assert plan_batches([3, 3, 3], 10, spans=[50, 2, 2]) == [[0], [1, 2]]  # cost 50 sorts first
    assert plan_batches([4, 4, 4], 10, longest_first=False) == [[0, 1], [2]]
    assert plan_batches([4, 4, 4], 10, spans=[1, 10, 1], longest_first=False) == [[0], [1], [2]]
    # input order kept when asked; longest first (ties by position) by default
    assert plan_batches([2, 9, 2, 9], 11, longest_first=False) == [[0, 1], [2, 3]]
    assert plan_batches([2, 9, 2, 9], 11) == [[1], [3, 0], [2]]
    with pytest.raises(ValueError, match="spans has 1 counts but tokens has 2"):
        plan_batches([1, 2], 10, spans=[1])


def test_extract_runs_exactly_the_plans_batches(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    rec = RecordingEngine(m._engine)
    m._engine = rec
    seqs = [seq(n, i) for i, n in enumerate([10, 25, 4, 30, 3, 12])]
    spans = [np.array([[0, 1]] * k) for k in (2, 1, 20, 1, 3, 1)]  # sequence 2: more spans than tokens
    out = m.extract(seqs, spans, max_batch_tokens=40)
    plan = plan_batches([len(s) for s in seqs], 40, [len(s) for s in spans], longest_first=False)
    assert [c[0] for c in rec.calls] == [[len(seqs[i]) for i in b] for b in plan]
    assert [c[1] for c in rec.calls] == [sum(len(spans[i]) for i in b) for b in plan]
    assert all(max(sum(t), s) <= 40 for t, s, _ in rec.calls)
    assert [o.shape[1] for o in out] == [len(s) for s in spans]


def test_pipeline_runs_exactly_its_planned_batches(tiny_model_dir, tmp_path):
    m = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    rec = RecordingEngine(m._engine)
    m._engine = rec
    src = tmp_path / "r.jsonl"
    rows = [{"id": f"r{i}", "question": "Q " * (i % 5), "steps": [f"step {j} of {i}" for j in range(1 + i % 3)]}
            for i in range(11)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rl.extract_dataset(src, m, tmp_path / "run", shard_size=4, max_batch_tokens=40, progress=False)
    store = rl.open_latents(tmp_path / "run")
    expected, pos = [], 0
    for shard in store.shards:  # the planning window is one shard, longest first
        metas = [store[pos + j].meta for j in range(shard["items"])]
        pos += shard["items"]
        tokens, steps = [x["num_tokens"] for x in metas], [x["num_steps"] for x in metas]
        expected += [[tokens[i] for i in b] for b in plan_batches(tokens, 40, steps)]
    assert [c[0] for c in rec.calls] == expected and len(expected) > len(store.shards)


# -- the caller's Model is never changed --------------------------------------------

def test_extract_dataset_leaves_the_model_as_it_was(tiny_model_dir, tmp_path):
    m = rl.Model(tiny_model_dir("llama"), device="cpu", max_batch_tokens=32, threads=1)
    before = state(m)
    rec = RecordingEngine(m._engine)
    m._engine = rec
    src = tmp_path / "r.jsonl"
    long_step = " ".join(["clips"] * 60)  # one record far over both budgets
    rows = [{"id": "short", "steps": ["she sold 48"]}, {"id": "long", "steps": [long_step]},
            {"id": "mid", "steps": ["Natalia sold clips to 48 of her friends in April"]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rl.extract_dataset(src, m, tmp_path / "a", max_batch_tokens=48, progress=False)
    assert max(sum(t) for t, _, _ in rec.calls) > 48   # the long record did run
    assert min(cap for _, _, cap in rec.calls) == 48   # the run's budget held the workspace
    assert max(cap for _, _, cap in rec.calls) > 48    # grown for the long record's batch only
    assert state(m) == before                          # and everything given back
    rl.extract_dataset(src, m, tmp_path / "b", progress=False)
    assert state(m) == before
    big = rl.Model(tiny_model_dir("llama"), device="cpu", max_batch_tokens=4096, threads=1)
    rl.extract_dataset(src, big, tmp_path / "c", progress=False)
    for name in ("a", "b"):  # the same bytes whatever the workspace size
        for x, y in zip(rl.open_latents(tmp_path / name), rl.open_latents(tmp_path / "c")):
            assert np.array_equal(x.latents, y.latents)


def test_extract_and_hidden_states_leave_the_model_as_it_was(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cpu", max_batch_tokens=16, threads=1)
    before = state(m)
    ref = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    long = seq(100, 3)
    np.testing.assert_array_equal(m.hidden_states(long), ref.hidden_states(long))
    assert state(m) == before
    out = m.extract([seq(5), long], max_batch_tokens=200)
    np.testing.assert_array_equal(out[1], ref.extract([long])[0])
    assert state(m) == before


def test_run_batch_takes_only_this_models_checked_sequences(tiny_model_dir):
    a = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    b = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    c = a.check(seq(8))
    assert a.run_batch([c], [-2])[0].shape == (1, 1, 64)
    with pytest.raises(TypeError, match="this Model's check"):
        b.run_batch([c], [-2])
    with pytest.raises(TypeError, match="this Model's check"):
        a.run_batch([seq(8)], [-2])
    with pytest.raises(ValueError, match="per_token=False cannot run with pooling='none'"):
        a.run_batch([c], [-2], "none")
    t = a.check(seq(8), per_token=True)
    np.testing.assert_array_equal(a.run_batch([t], [1], "none")[0], a.hidden_states(seq(8), [1]))


# -- one exception class per kind of mistake ------------------------------------------

@pytest.mark.parametrize("call,cls", [
    (lambda m: m.extract([[1, VOCAB]]), errors.TokenIdError),
    (lambda m: m.extract([[1, -3]]), errors.TokenIdError),
    (lambda m: m.hidden_states([999]), errors.TokenIdError),
    (lambda m: m.extract([[]]), errors.SequenceError),
    (lambda m: m.extract([np.zeros((2, 2), int)]), errors.SequenceError),
    (lambda m: m.extract([[1.0]]), errors.SequenceTypeError),
    (lambda m: m.extract(np.array([1, 2])), errors.SequenceTypeError),
    (lambda m: m.extract([[1, 2]], [[[0, 3]]]), errors.SpanError),
    (lambda m: m.extract([[1, 2]], [[[0, 1]], [[0, 1]]]), errors.SpanError),
    (lambda m: m.extract([[1, 2]], [[[0, 1]]], pooling="none"), errors.SpanError),
    (lambda m: m.extract([[1, 2]], [np.array([[0.0, 1.0]])]), errors.SpanTypeError),
    (lambda m: m.extract([[1, 2]], layers=(9,)), errors.LayerError),
    (lambda m: m.extract([[1, 2]], layers=()), errors.LayerError),
    (lambda m: m.extract([[1, 2]], layers=("1",)), errors.LayerTypeError),
])
def test_each_mistake_has_its_class(tiny_model_dir, call, cls):
    m = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    with pytest.raises(cls) as e:
        call(m)
    assert isinstance(e.value, rl.InputError) and isinstance(e.value, ValueError)
    assert isinstance(e.value, TypeError) == cls.__name__.endswith("TypeError")
    assert getattr(rl, cls.__name__) is cls  # importable from the package


def test_sliding_window_is_no_length_error(tiny_model_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("mistral"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    m = rl.Model(d, device="cpu", threads=1)
    assert m.check(seq(9)).ids.size == 9   # the window is applied, not a limit
    assert m.hidden_states(seq(9)).shape == (4, 9, 64)
    assert len(m.extract([seq(8), seq(9)])) == 2


@pytest.mark.gpu
@pytest.mark.skipif(rl._native._core.cuda_device_count() == 0, reason="no CUDA device")
def test_cuda_refuses_a_sequence_over_its_workspace(tiny_model_dir):
    m = rl.Model(tiny_model_dir("llama"), device="cuda:0", max_batch_tokens=64)
    before = state(m)
    with pytest.raises(rl.SequenceLengthError, match=r"seqs\[0\] needs 65 tokens of workspace"):
        m.extract([seq(65)])
    with pytest.raises(ValueError, match="more than the 64 reserved on cuda:0"):
        m.extract([seq(40), seq(40)], max_batch_tokens=128)
    assert m.extract([seq(40), seq(40)])[0].shape == (1, 1, 64) and state(m)[:3] == before[:3]

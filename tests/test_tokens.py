"""Token selection (tokens=all|text|steps|no-special, drop_bos) against HF's
tokenizer and the chat template's own rendering; per-token row keys and
norms; norm outliers; pooling under a selection."""
import json

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from test_chat_pipeline import RECORDS, _chat_model, _messages, write_jsonl

# a literal special token inside a step: kept by "all", dropped by "text" / "no-special"
TEXT_RECORDS = [
    {"id": "p", "question": "How many apples?", "steps": ["Step 1: 3 + 4 = 7 apples.", "Step 2: so </s> 7."]},
    {"id": "q", "question": "Twice 21?", "steps": ["2 * 21 = 42", "The answer is 42."]},
    {"id": "r", "steps": ["No question, one step only."]},
]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf(llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(llama))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("tok") / "d.jsonl", TEXT_RECORDS)


def _extract(data, model, out, **kw):
    kw.setdefault("pooling", "none")
    return rl.extract_dataset(data, str(model), str(out), layers=[1, 2], progress=False, **kw)


@pytest.fixture(scope="module")
def all_run(tmp_path_factory, data, llama):
    out = tmp_path_factory.mktemp("all") / "run"
    _extract(data, llama, out)
    return rl.open_latents(out)


def _special_ids(hf):
    return {i for i, t in hf.added_tokens_decoder.items() if t.special}


def _step_ranges(rec):
    """Character ranges of the steps in '{question}\\n{steps}' (the default template)."""
    pos = len(rec["question"]) + 1 if rec.get("question") else 0
    out = []
    for s in rec["steps"]:
        out.append((pos, pos + len(s)))
        pos += len(s) + 1
    return out


def _text(rec):
    return (rec["question"] + "\n" if rec.get("question") else "") + "\n".join(rec["steps"])


@pytest.mark.parametrize("mode,drop_bos", [("all", False), ("no-special", False), ("text", True),
                                           ("steps", False), ("all", True)])
def test_selection_matches_hf_tokenizer(tmp_path, data, llama, hf, all_run, mode, drop_bos):
    _extract(data, llama, tmp_path / "run", tokens=mode, drop_bos=drop_bos)
    st = rl.open_latents(tmp_path / "run")
    assert st.config["token_selection"] == {"tokens": mode, "drop_bos": drop_bos}
    special = _special_ids(hf)
    for i, rec in enumerate(TEXT_RECORDS):
        enc = hf(_text(rec), return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        steps = _step_ranges(rec)
        want = []
        for p, (t, (a, b)) in enumerate(zip(ids, offs)):
            if mode in ("text", "no-special") and t in special:
                continue
            if mode == "steps" and not (b > a and any(a < e and b > s for s, e in steps)):
                continue
            if drop_bos and p == 0 and t in special:   # the tokenizer's BOS <s>
                continue
            want.append(p)
        it = st[i]
        assert it.token_key("token_positions").tolist() == want
        assert it.token_key("token_ids").tolist() == [ids[p] for p in want]
        # the rows are the full run's rows at those positions, bitwise
        np.testing.assert_array_equal(it.latents, all_run[i].latents[:, want])
        np.testing.assert_array_equal(it.token_steps, all_run[i].token_steps[want])
        assert it.latents.shape[1] == len(want)
    assert "</s>" in TEXT_RECORDS[0]["steps"][1]
    n_special = sum(t in special for t in all_run[0].token_key("token_ids").tolist())
    assert n_special == 2   # the BOS and the literal special token
    total = sum(len(it.token_key("token_ids")) for it in st)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["totals"]["tokens"] == total


def test_norms_outliers_and_drop(tmp_path, data, llama, all_run):
    for it in all_run:   # every row's norm is stored
        x = it.latents.astype(np.float64)
        np.testing.assert_allclose(it.token_key("token_norms"), np.linalg.norm(x, axis=-1), rtol=1e-6)
    k = 1.1
    s = _extract(data, llama, tmp_path / "mark", outliers=k)
    st = rl.open_latents(tmp_path / "mark")
    norms = np.concatenate([it.token_key("token_norms") for it in st], axis=1)   # one shard
    assert len(st.shards) == 1
    marks = norms > k * np.median(norms.astype(np.float64), axis=1, keepdims=True)
    got = np.concatenate([it.token_key("token_outliers") for it in st], axis=1).astype(bool)
    np.testing.assert_array_equal(got, marks)
    assert 0 < marks.any(axis=0).sum() < marks.shape[1]
    manifest = json.loads((tmp_path / "mark" / "manifest.json").read_text())
    assert manifest["totals"]["outliers"] == int(marks.any(axis=0).sum()) == s["outliers"]
    _extract(data, llama, tmp_path / "drop", outliers=k, drop_outliers=True)
    dropped = rl.open_latents(tmp_path / "drop")
    for a, b in zip(st, dropped):
        keep = ~a.token_key("token_outliers").astype(bool).any(axis=0)
        np.testing.assert_array_equal(b.latents, a.latents[:, keep])
        np.testing.assert_array_equal(b.token_key("token_positions"), a.token_key("token_positions")[keep])
        assert not b.token_key("token_outliers").any()


def test_pooling_pools_the_selected_tokens(tmp_path, data, llama, all_run):
    s = _extract(data, llama, tmp_path / "steps", pooling="mean", tokens="steps", drop_bos=True)
    st = rl.open_latents(tmp_path / "steps")
    assert s["errors"] == 0
    for i, it in enumerate(st):
        full = all_run[i]
        for k, (a, b) in enumerate(it.token_spans):
            assert (full.token_steps[a:b] == k).all()   # a step's span holds only its own tokens
            np.testing.assert_allclose(it.latents[:, k], full.latents[:, a:b].mean(axis=1), rtol=1e-5, atol=1e-6)
    # a special token inside a step cannot be skipped by a contiguous span: that record is an error
    s = _extract(data, llama, tmp_path / "text", pooling="mean", tokens="text")
    assert s["errors"] == 1
    err = [json.loads(x) for x in (tmp_path / "text" / "errors.jsonl").read_text().splitlines()]
    assert err[0]["id"] == "p" and "step 2" in err[0]["reason"] and "contiguous" in err[0]["reason"]
    # pooled runs keep their configuration unless a selection is asked for
    _extract(data, llama, tmp_path / "plain", pooling="mean")
    assert "token_selection" not in rl.open_latents(tmp_path / "plain").config


def test_chat_text_drops_the_template_scaffolding(tmp_path, tiny_model_dir):
    d = _chat_model(tmp_path, tiny_model_dir)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(d))
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    for mode in ("text", "no-special", "all"):
        rl.extract_dataset(str(data), str(d), str(tmp_path / mode), pooling="none", layers=[1], chat=True,
                           system="Be brief.", tokens=mode, progress=False)
    special = _special_ids(hf)
    for i, rec in enumerate(RECORDS):
        msgs = _messages(rec, False, "Be brief.")
        text = hf.apply_chat_template(msgs, tokenize=False)
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        content, pos = [], 0   # each message's string, found in order in the template's rendering
        for m in msgs:
            if m["content"]:
                at = text.index(m["content"], pos)
                content.append((at, at + len(m["content"])))
                pos = at + len(m["content"])
        want_text = [p for p, (t, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"]))
                     if t not in special and any(a < e and b > s for s, e in content)]
        want_nospecial = [p for p, t in enumerate(enc["input_ids"]) if t not in special]
        got = {mode: rl.open_latents(tmp_path / mode)[i].token_key("token_positions").tolist()
               for mode in ("text", "no-special", "all")}
        assert got["text"] == want_text
        assert got["no-special"] == want_nospecial
        assert got["all"] == list(range(len(enc["input_ids"])))
        dropped = hf.decode([enc["input_ids"][p] for p in sorted(set(want_nospecial) - set(want_text))])
        assert "user" in dropped and "assistant" in dropped   # role names are scaffolding


def test_bad_options_are_refused(tmp_path, data, llama):
    for kw, msg in ((dict(tokens="words"), "tokens must be one of"),
                    (dict(outliers=-1.0), "outliers must be a positive"),
                    (dict(drop_outliers=True), "drop_outliers needs outliers"),
                    (dict(pooling="mean", outliers=3.0), "needs pooling='none'")):
        with pytest.raises(ValueError, match=msg):
            _extract(data, llama, tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()
    assert cli_main(["extract", str(data), "--model", str(llama), "--out", str(tmp_path / "c"), "--pooling",
                     "none", "--layers", "1", "--tokens", "steps", "--drop-bos", "--outliers", "2",
                     "--no-progress"]) == 0
    st = rl.open_latents(tmp_path / "c")
    assert st.config["token_selection"] == {"tokens": "steps", "drop_bos": True}
    assert st.config["outliers"] == {"k": 2.0, "drop": False}


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, llama, monkeypatch):
    from conftest import interrupt_at_shard
    from rjepa_latent.testing.runs import sample_records, write_records
    data = write_records(tmp_path / "d.jsonl", sample_records(12, seed=3))
    kw = dict(tokens="text", drop_bos=True, outliers=1.2, drop_outliers=True, shard_size=4)
    _extract(data, llama, tmp_path / "whole", **kw)
    compute = interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _extract(data, llama, tmp_path / "cut", **kw)
    monkeypatch.setattr("rjepa_latent.run.local._Runner._compute", compute)
    _extract(data, llama, tmp_path / "cut", **kw)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cut").iterdir())
    for f in files:
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f


def test_readers_carry_the_row_keys(tmp_path, data, llama):
    from rjepa_latent.store import export as rl_export
    _extract(data, llama, tmp_path / "run", tokens="steps")
    st = rl.open_latents(tmp_path / "run")
    table = st.to_hf_dataset(1)
    for i, it in enumerate(st):
        assert table[i]["token_positions"] == it.token_key("token_positions").tolist()
        assert table[i]["token_ids"] == it.token_key("token_ids").tolist()
        assert table[i]["token_steps"] == it.token_steps.tolist()
    res = rl_export.export_npy(st, tmp_path / "npy", layers=[2])
    assert "token_ids.npy" in res["files"] and "token_positions.npy" in res["files"]
    ids = np.load(tmp_path / "npy" / "token_ids.npy")
    np.testing.assert_array_equal(ids, np.concatenate([it.token_key("token_ids") for it in st]))

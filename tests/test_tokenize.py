"""Step token spans from tokenizer offsets (first-overlap rule), checked against
a slow reference written independently here, on adversarial records; the
no-token and too-long errors; no silent truncation."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import make_tokenizer
from rjepa_latent.data import ErrorRecord, Record, Template, read_records
from rjepa_latent.tokenize import Item, prepare_tokenizer, step_spans, tokenize_records, tokenizer_hash

ADVERSARIAL = [
    {"id": "scripts", "question": "Что? 什么? ماذا? क्या?", "steps": ["Привет мир", "你好世界", "مرحبا بالعالم", "नमस्ते"]},
    {"id": "emoji", "question": "😀?", "steps": ["👩‍👩‍👧 family", "🇫🇷 flag", "x😀y"]},
    {"id": "latex", "question": r"Solve $x^2=4$", "steps": [r"$\frac{a}{b} = \sqrt{x_1^2}$", r"\begin{align} x &= 2 \end{align}"]},
    {"id": "crlf", "question": "Q\r\n", "steps": ["line one\r\nline two", "end\r"]},
    {"id": "markers", "question": "Step 1: not a step", "steps": ["Step 2: inside Step 3: still one step", "Step 4:"]},
    {"id": "multiline", "question": "Q", "steps": ["a\nb\n\nc", "d\n"]},
    {"id": "whitespace", "question": "Q", "steps": ["a", "   ", "\t", "b"]},
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

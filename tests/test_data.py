"""Dataset readers: formats, aliases, ids, metadata, exact step character
ranges of the template, and every bad-record kind (an error record, never an
exception, never silently dropped)."""
import json

import pytest

from rjepa_latent.inputs.data import ErrorRecord, Record, Template, read_records


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def steps_of(rec: Record):
    return [rec.text[a:b] for a, b in rec.steps]


def test_cot_default_template_exact_ranges(tmp_path):
    steps = ["First, 2+2=4.", "Then 4*3 = 12.", "#### 12"]
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "question": "What?", "steps": steps}])
    (rec,) = list(read_records([p]))
    assert rec.text == "What?\n" + "\n".join(steps)
    assert steps_of(rec) == steps
    assert (rec.id, rec.line, rec.source, rec.index) == ("a", 1, "d.jsonl", 0)


def test_aliases_numeric_ids_default_ids_and_metadata(tmp_path):
    rows = [{"cot_id": 7, "statement": "S?", "steps": ["x"], "source": "mine", "score": 0.5, "tags": ["a"]},
            {"problem": "P?", "steps": ["y"], "level": 3, "text": "orig"},
            ""]  # a blank line is no record
    p = write_jsonl(tmp_path / "set.jsonl", rows)
    a, b = list(read_records([p]))
    assert a.id == "7" and a.text == "S?\nx"
    assert a.meta == {"record_source": "mine", "score": 0.5}  # lists are not scalar; reserved names renamed
    assert b.id == "set:2" and b.text == "P?\ny" and b.meta == {"level": 3, "record_text": "orig"}


def test_gsm8k_steps_are_nonblank_answer_lines_crlf(tmp_path):
    ans = "Janet has 16 - 3 = 13.\r\n\r\n  \nShe earns 13 * 2 = $26.\r\n#### 26"
    p = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": ans}])
    (rec,) = list(read_records([p], fmt="gsm8k"))
    assert steps_of(rec) == ["Janet has 16 - 3 = 13.", "She earns 13 * 2 = $26.", "#### 26"]
    assert rec.id == "g:1"


def test_text_format_markers_context_and_no_marker(tmp_path):
    text = "Context here.\nStep 1: add 2.\nStep  2: mul 3.\n\nStep 10: done"
    rows = [{"id": 1, "text": text}, {"id": 2, "text": "  just one step \n"}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    a, b = list(read_records([p]))
    assert steps_of(a) == ["Step 1: add 2.", "Step  2: mul 3.", "Step 10: done"]
    assert steps_of(b) == ["just one step"]
    (c,) = list(read_records([write_jsonl(tmp_path / "u.jsonl", [{"id": 1, "text": "A) x B) y"}])],
                             step_regex=r"[A-Z]\)"))
    assert steps_of(c) == ["A) x", "B) y"]


def test_json_array_lines_are_element_index_plus_one(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"id": "a", "steps": ["s"]}, {"id": "b", "steps": []}]))
    a, b = list(read_records([p]))
    assert isinstance(a, Record) and a.line == 1 and a.text == "s"  # no question: steps alone
    assert isinstance(b, ErrorRecord) and b.line == 2 and b.id == "b" and "empty step list" in b.reason


def test_custom_template_and_separator_ranges(tmp_path):
    t = Template("Q: {question}\nA:{{ok}} {steps}\nEND", step_separator=" | ")
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "question": "é?", "steps": ["α β", "Step 2: γ"]}])
    (rec,) = list(read_records([p], template=t))
    assert rec.text == "Q: é?\nA:{ok} α β | Step 2: γ\nEND"
    assert steps_of(rec) == ["α β", "Step 2: γ"]


@pytest.mark.parametrize("bad", ["{question}", "{steps}{steps}", "{foo}{steps}", "{steps:>3}", "{steps"])
def test_bad_templates_are_refused(bad):
    with pytest.raises(ValueError, match="template"):
        Template(bad)


def test_every_bad_record_kind(tmp_path):
    lines = [
        '{"id": "ok", "steps": ["fine"]}',
        '{"id": "broken", "steps": [',                     # invalid JSON
        '{"id": "m", "question": "q"}',                     # missing steps (auto: cannot tell)
        '{"id": "n", "steps": "not a list"}',
        '{"id": "e", "steps": []}',
        '{"id": "s", "steps": ["a", ""]}',
        '{"id": "t", "steps": ["a", 3]}',
        '{"id": "ok", "steps": ["again"]}',                 # duplicate id
        '[1, 2]',                                            # not an object
        '{"id": [1], "steps": ["a"]}',                      # bad id type
        '{"id": "w", "text": "   "}',                       # empty text
        '',
        '{"id": "last", "steps": ["end"]}',
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    out = list(read_records([p]))
    kinds = [(o.id, o.line, type(o).__name__) for o in out]
    assert kinds[0] == ("ok", 1, "Record") and kinds[-2] == ("last", 13, "Record")
    errs = {o.line: o for o in out if isinstance(o, ErrorRecord)}
    expect = {2: "invalid JSON", 3: "cannot tell the format", 4: "must be a list", 5: "empty step list",
              6: "step 2 is an empty string", 7: "step 2 is not a string", 8: "duplicate id 'ok'",
              9: "must be a JSON object", 10: "must be a string or an integer", 11: "'text' is empty",
              14: "not valid UTF-8"}
    assert sorted(errs) == sorted(expect)
    for line, text in expect.items():
        assert text in errs[line].reason, (line, errs[line].reason)
    assert errs[8].id == "ok" and "bad.jsonl:1" in errs[8].reason
    assert errs[2].id == "broken"  # salvaged from the broken JSON for the error line
    assert [o.index for o in out] == list(range(len(out)))  # every record keeps its slot
    (m,) = [o for o in read_records([p], fmt="cot") if o.line == 3]
    assert "missing 'steps'" in m.reason


def test_bad_json_file_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"not": "an array"}')
    (e,) = list(read_records([p]))
    assert isinstance(e, ErrorRecord) and "array" in e.reason
    p.write_text("[{]")
    (e,) = list(read_records([p]))
    assert "not valid JSON" in e.reason
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_records([tmp_path / "nope.jsonl"]))
    with pytest.raises(ValueError, match="format"):
        list(read_records([p], fmt="csv"))


def test_utf8_bom_and_crlf_lines(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"id": "a", "steps": ["x"]}\r\n\r\n{"id": "b", "steps": ["y"]}\r\n')
    assert [(r.id, r.line) for r in read_records([p])] == [("a", 1), ("b", 3)]
    q = tmp_path / "bom.json"
    q.write_bytes(b'\xef\xbb\xbf[{"id": "c", "steps": ["z"]}]')
    assert [r.id for r in read_records([q])] == ["c"]


def test_lone_surrogate_escapes_are_error_records(tmp_path):
    # valid JSON, but not Unicode text: the tokenizer raised TypeError and aborted the run
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": "a", "steps": ["x \\ud800 y", "z"]}\n'
                 '{"id": "b\\udc00", "steps": ["ok", "fine"]}\n'
                 '{"id": "c", "steps": ["ok", "fine"], "note": "\\udfff"}\n'
                 '{"id": "d", "steps": ["smile \\ud83d\\ude00", "fine"]}\n'
                 '{"id": "e\\ud800", "steps": [\n', encoding="ascii")
    recs = list(read_records([p]))
    assert [type(r).__name__ for r in recs] == ["ErrorRecord", "ErrorRecord", "ErrorRecord", "Record", "ErrorRecord"]
    assert [r.id for r in recs] == ["a", None, "c", "d", None]  # ids that are not Unicode are dropped
    assert all("lone UTF-16 surrogate (\\ud800" in r.reason for r in recs[:1])
    assert "\\udc00" in recs[1].reason and "\\udfff" in recs[2].reason and "invalid JSON" in recs[4].reason
    for r in recs:
        json.dumps(r.to_json() if isinstance(r, ErrorRecord) else r.text, ensure_ascii=False).encode("utf-8")


def test_files_that_cannot_hold_records_are_refused_by_read_records_too(tmp_path):
    from rjepa_latent.inputs.sources import InputFileError
    p = tmp_path / "m.jsonl"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 32)
    with pytest.raises(InputFileError, match=r"'.*m\.jsonl' is not JSON text: .*GGUF model file; pass it as --model"):
        list(read_records([p]))
    assert issubclass(InputFileError, ValueError)


def test_line_endings_cr_only_crlf_and_bom_mid_file(tmp_path):
    p = tmp_path / "cr.jsonl"
    p.write_bytes(b'{"id": "a", "steps": ["x"]}\r{"id": "b", "steps": ["y"]}\r\r{"id": "c", "steps": ["z"]}\r')
    assert [(r.id, r.line, r.text) for r in read_records([p])] == [("a", 1, "x"), ("b", 2, "y"), ("c", 4, "z")]
    # a file with \n line ends: a raw \r inside a line is JSON whitespace (as before); a BOM
    # where files were concatenated is dropped
    p.write_bytes(b'{"id": "a",\r "steps": ["x"]}\r\n\r\n{"id": "c", "steps": ["z"]}\n'
                  b'\xef\xbb\xbf{"id": "d", "steps": ["w"]}')
    assert [(r.id, r.line, r.text) for r in read_records([p])] == [("a", 1, "x"), ("c", 3, "z"), ("d", 4, "w")]

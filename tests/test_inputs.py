"""Inputs in the formats datasets come in: Parquet files and HF
`datasets.Dataset` objects read with the JSONL field rules (compared with what
pyarrow / datasets themselves hold), a Dataset's fingerprint; segmentation
rules with exact ranges on tricky text; a record's own step_ranges;
GSM8K annotation stripping with exact offsets."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from rjepa_latent.inputs.data import ErrorRecord, Record, read_records
from rjepa_latent.inputs.segment import Segmenter, remove_annotations
from rjepa_latent.inputs.sources import dataset_fingerprint

ROWS = [
    {"id": "7", "question": "Natalia sold 48 clips. Ünïcödé?", "steps": ["She sold 48 / 2 = 24.", "48 + 24 = 72"],
     "score": 0.5, "text": None},
    {"id": "g1", "question": "Weng earns $12 an hour.", "answer": "12 / 60 = <<12/60=0.2>>0.2\n#### 10",
     "steps": None, "score": None},
    {"id": None, "question": None, "text": "Context.\nStep 1: add 2.\nStep 2: done", "score": 1.0},
    {"id": "e", "question": "Q", "steps": [], "score": 2.0},
    {"id": "7", "question": "dup", "steps": ["x"], "score": 3.0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _key(r):
    if isinstance(r, ErrorRecord):   # the reason may name the file: the same one for either
        return ("error", r.index, r.id, r.line, r.reason.replace(".parquet:", ".jsonl:"))
    return ("record", r.index, r.id, r.text, r.steps, r.meta, r.line)


def _table(rows):
    """A table with a column for every field of any row (from_pylist takes the first row's only)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})


def _dataset(rows):
    import datasets
    return datasets.Dataset.from_dict(_table(rows).to_pydict())


def _jsonl_equivalent(rows):
    """The rows as Arrow gives them back (a missing column value is null): what the JSONL would hold."""
    return _table(rows).to_pylist()


def test_parquet_reads_like_jsonl(tmp_path):
    table = _table(ROWS)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)   # several row groups, in order
    as_arrow = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert as_arrow == _jsonl_equivalent(ROWS)
    j = [_key(r) for r in read_records([write_jsonl(tmp_path / "d.jsonl", as_arrow)])]
    p = list(read_records([tmp_path / "d.parquet"]))
    assert [_key(r) for r in p] == j
    assert [r.source for r in p] == ["d.parquet"] * len(ROWS)
    kinds = [type(r).__name__ for r in p]
    assert kinds == ["Record", "Record", "Record", "ErrorRecord", "ErrorRecord"]
    assert p[2].id == "d:3" and "empty step list" in p[3].reason and "duplicate id '7'" in p[4].reason
    assert p[0].meta == {"score": 0.5, "answer": None, "record_text": None}   # nulls are carried
    pq.write_table(pa.table({"id": [1, 2], "steps": [["a"], ["b", "c"]], "n": [3, None]}), tmp_path / "i.pq")
    assert [(r.id, r.text, r.meta) for r in read_records([tmp_path / "i.pq"])] == [
        ("1", "a", {"n": 3}), ("2", "b\nc", {"n": None})]    # an int64 id column: decimal strings


def test_a_dataset_reads_like_jsonl_in_its_own_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = _dataset(ROWS[:3] + [{"id": "z", "question": "Q", "steps": ["s"], "score": 4.0}])
    view = ds.select([3, 0, 2])                 # an indices mapping: its order, not the table's
    rows = [view[i] for i in range(len(view))]  # what datasets itself gives
    j = [_key(r) for r in read_records([write_jsonl(tmp_path / "dataset.jsonl", rows)])]
    got = list(read_records(view))
    assert [_key(r) for r in got] == j and [r.id for r in got] == ["z", "7", "dataset:3"]
    assert {r.source for r in got} == {"dataset"}
    with pytest.raises(TypeError, match="pick one"):
        list(read_records(datasets.DatasetDict({"test": ds})))
    with pytest.raises(TypeError, match="IterableDataset"):
        list(read_records(ds.to_iterable_dataset()))


def test_dataset_fingerprint_is_its_rows():
    datasets = pytest.importorskip("datasets")
    a = _dataset(ROWS[:3])
    b = datasets.Dataset.from_dict({k: [r.get(k) for r in ROWS[:3]] for k in a.column_names})
    fa = dataset_fingerprint(a)
    assert fa == dataset_fingerprint(b) and fa["rows"] == 3 and fa["name"] == "dataset"
    assert dataset_fingerprint(a.select([1, 0, 2])) != fa                   # order counts
    changed = a.map(lambda r: {"score": 9.0} if r["id"] == "7" else {})
    assert dataset_fingerprint(changed) != fa


def test_extract_from_parquet_and_dataset_equals_jsonl(tmp_path, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    model = rl.Model(tiny_model_dir("llama"), device="cpu")
    rows = _jsonl_equivalent(ROWS)
    runs = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows), "parquet": tmp_path / "d.parquet",
            "dataset": _dataset(rows)}
    pq.write_table(_table(rows), runs["parquet"])
    for name, src in runs.items():
        s = rl.extract_dataset(src, model, tmp_path / name, shard_size=2, progress=False)
        assert s["items"] == 3 and s["errors"] == 2
    ref = rl.open_latents(tmp_path / "jsonl")
    for name in ("parquet", "dataset"):
        st = rl.open_latents(tmp_path / name)
        assert [e["reason"].replace(".jsonl:", ".parquet:") for e in ref.errors] == \
            [e["reason"].replace("dataset:", "d.parquet:") for e in st.errors]
        for a, b in zip(st, ref):
            assert a.meta["text"] == b.meta["text"] and np.array_equal(a.latents, b.latents)
            assert np.array_equal(a.token_spans, b.token_spans)
        for k in range(3):   # the latents files are the same bytes whatever the input's format
            f = f"shard-{k:05d}.safetensors"
            assert (tmp_path / name / f).read_bytes() == (tmp_path / "jsonl" / f).read_bytes()
    assert rl.open_latents(tmp_path / "dataset").config["inputs"][0]["rows"] == 5
    other = _dataset(rows[:4])
    with pytest.raises(rl.StoreError, match="inputs: stored"):
        rl.extract_dataset(other, model, tmp_path / "dataset", shard_size=2, progress=False)
    assert rl.extract_dataset(runs["dataset"], model, tmp_path / "dataset", shard_size=2,
                              progress=False)["noop"]


def test_unreadable_parquet_is_refused_naming_the_file(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="bad.parquet.*not a readable Parquet file"):
        list(read_records([bad]))
    assert cli_main(["extract", str(bad), "--model", str(tiny_model_dir("llama")), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ segmentation

TRICKY = ("Héllo wörld.  Second “quoted.” Third?  \r\n\r\n  Para 2 line one\r\nline two 3.5 stays…  \r\n"
          "\t \n最后一句。第二句！end \u00a0\rlast line\u3000")


def _steps(rule, text):
    return [text[a:b] for a, b in Segmenter(rule).split(text)]


def test_segment_rules_exact_ranges_on_tricky_text():
    assert _steps("lines", TRICKY) == ["Héllo wörld.  Second “quoted.” Third?", "Para 2 line one",
                                       "line two 3.5 stays…", "最后一句。第二句！end", "last line"]
    assert _steps("paragraphs", TRICKY) == ["Héllo wörld.  Second “quoted.” Third?",
                                            "Para 2 line one\r\nline two 3.5 stays…",
                                            "最后一句。第二句！end \u00a0\rlast line"]
    assert _steps("sentences", TRICKY) == ["Héllo wörld.", "Second “quoted.”", "Third?",
                                           "Para 2 line one\r\nline two 3.5 stays…", "最后一句。", "第二句！",
                                           "end \u00a0\rlast line"]
    assert _steps(r"regex:(?m)^\S", TRICKY) == [
        "Héllo wörld.  Second “quoted.” Third?  \r\n\r\n  Para 2 line one", "line two 3.5 stays…",
        "最后一句。第二句！end \u00a0\rlast line\u3000"[:-1]]   # \r is no line start for ^: one step
    for rule in ("lines", "paragraphs", "sentences"):
        for a, b in Segmenter(rule).split(TRICKY):    # never an edge of whitespace, never empty
            assert b > a and not TRICKY[a].isspace() and not TRICKY[b - 1].isspace()


def test_segment_in_records_and_errors(tmp_path):
    rows = [{"id": "t", "text": TRICKY}, {"id": "g", "question": "Q?", "answer": "One. Two!\n\n#### 3"},
            {"id": "blank", "text": "x", "step_ranges": []}]
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    t, g, blank = list(read_records([p], segment="sentences"))
    assert [t.text[a:b] for a, b in t.steps] == _steps("sentences", TRICKY) and t.text == TRICKY
    assert g.text == "Q?\nOne.\nTwo!\n#### 3" and [g.text[a:b] for a, b in g.steps] == ["One.", "Two!", "#### 3"]
    assert isinstance(blank, ErrorRecord) and "'step_ranges' must be a non-empty list" in blank.reason
    (e,) = list(read_records([write_jsonl(tmp_path / "z.jsonl", [{"id": 1, "text": "aXbX"}])],
                             segment="regex:X?"))
    assert isinstance(e, ErrorRecord) and "step 5 is empty: the step regex" in e.reason   # zero-width, at the end
    for bad, msg in (("words", "is not one of"), ("regex:(", "not a valid regular expression"),
                     ("regex:", "needs a pattern")):
        with pytest.raises(ValueError, match=msg):
            list(read_records([p], segment=bad))
    # the default is today's rule: markers for text, answer lines as they are for gsm8k
    t, g, _ = list(read_records([p]))
    assert [t.text[a:b] for a, b in t.steps] == [TRICKY.strip()]
    assert [g.text[a:b] for a, b in g.steps] == ["One. Two!", "#### 3"]


def test_record_step_ranges_are_validated(tmp_path):
    text = "Ünï 🤖 step one.\r\nstep two  "
    good = [[0, 15], [17, 25]]
    rows = [{"id": "ok", "text": text, "step_ranges": good, "tag": "x"},
            {"id": "tuple-ish", "text": text, "step_ranges": [[0, 3, 4]]},
            {"id": "floaty", "text": text, "step_ranges": [[0.0, 3]]},
            {"id": "out", "text": text, "step_ranges": [[0, len(text) + 1]]},
            {"id": "empty", "text": text, "step_ranges": [[3, 3]]},
            {"id": "neg", "text": text, "step_ranges": [[-1, 3]]},
            {"id": "overlap", "text": text, "step_ranges": [[0, 5], [4, 9]]},
            {"id": "order", "text": text, "step_ranges": [[10, 12], [0, 5]]},
            {"id": "missing", "text": text}]
    p = write_jsonl(tmp_path / "r.jsonl", rows)
    out = {r.id: r for r in read_records([p])}
    ok = out["ok"]
    assert isinstance(ok, Record) and ok.steps == [(0, 15), (17, 25)] and ok.meta == {"tag": "x"}
    assert [text[a:b] for a, b in ok.steps] == ["Ünï 🤖 step one.", "step two"]
    expect = {"tuple-ish": "pair of integers", "floaty": "pair of integers", "out": "not a non-empty range",
              "empty": "not a non-empty range", "neg": "not a non-empty range",
              "overlap": "must not overlap", "order": "must not overlap"}
    for rid, msg in expect.items():
        assert isinstance(out[rid], ErrorRecord) and msg in out[rid].reason, (rid, out[rid])
    assert isinstance(out["missing"], Record)   # without --segment ranges: the markers rule
    ranged = {r.id: r for r in read_records([p], segment="ranges")}
    assert ranged["ok"].steps == ok.steps and "missing 'step_ranges'" in ranged["missing"].reason


# ------------------------------------------------------------------ annotations

def test_strip_annotations_keeps_offsets_exact(tmp_path):
    answer = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\r\n"
              "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18")
    text = "Step 1: 48/2 = <<48/2=24>>24 clips. Step 2: <<48+24=72>>72 in total."
    rows = [{"id": "g", "question": "Q?", "answer": answer},
            {"id": "t", "text": text},
            {"id": "r", "text": text, "step_ranges": [[0, 35], [36, len(text)]]},
            {"id": "c", "steps": ["<<1+1=2>>2 apples", "<<3=3>>"]}]
    p = write_jsonl(tmp_path / "a.jsonl", rows)
    g, t, r, c = list(read_records([p], strip_annotations=True))
    assert g.text == ("Q?\nJanet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                      "She makes 9 * 2 = $18 every day at the farmer’s market.\n#### 18")
    assert [g.text[a:b] for a, b in g.steps] == ["Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
                                                 "She makes 9 * 2 = $18 every day at the farmer’s market.",
                                                 "#### 18"]
    stripped = "Step 1: 48/2 = 24 clips. Step 2: 72 in total."
    assert t.text == r.text == stripped
    assert [t.text[a:b] for a, b in t.steps] == ["Step 1: 48/2 = 24 clips.", "Step 2: 72 in total."]
    assert [r.text[a:b] for a, b in r.steps] == ["Step 1: 48/2 = 24 clips.", "Step 2: 72 in total."]
    assert isinstance(c, ErrorRecord) and "step 2 is nothing but calculator annotations" in c.reason
    g0, t0 = list(read_records([p]))[:2]      # without strip_annotations: unchanged
    assert "<<16-3-4=9>>9" in g0.text and t0.text == text
    s, where = remove_annotations("a<<x>>b<<y>>c")
    assert s == "abc" and [where(i) for i in range(14)] == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3]


def test_cli_segment_and_strip_are_in_the_configuration(tmp_path, tiny_model_dir, capsys):
    p = write_jsonl(tmp_path / "g.jsonl", [{"id": "g", "question": "Q?", "answer": "1 + 1 = <<1+1=2>>2.\n#### 2"}])
    args = ["extract", str(p), "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert cli_main([*args, "--segment", "sentences", "--strip-annotations"]) == 0
    st = rl.open_latents(tmp_path / "run")
    assert st.config["segment"] == "sentences" and st.config["strip_annotations"] is True
    assert st["g"].meta["text"] == "Q?\n1 + 1 = 2.\n#### 2"
    assert cli_main([*args, "--segment", "lines", "--strip-annotations"]) == 2
    assert "segment: stored 'sentences'" in capsys.readouterr().err
    assert cli_main([*args, "--segment", "sentences"]) == 2
    assert "strip_annotations: stored True, requested None" in capsys.readouterr().err
    assert cli_main([*args, "--strip-annotations"]) == 2
    assert "segment: stored 'sentences', requested None" in capsys.readouterr().err
    assert cli_main([*args, "--segment", "words"]) == 2
    assert "is not one of" in capsys.readouterr().err

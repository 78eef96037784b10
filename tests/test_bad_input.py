"""Bad input, as a table: each case is a data file (bytes, or a function that
writes it) run through `rjepa-latent extract` in-process on the tiny llama,
with its exact outcome:

- `refused`: the file cannot hold records (binary, not UTF-8, not JSON):
  exit status 2 before any work, the message names the file and what it looks
  like, nothing is written;
- `stopped`: every one of the first records is an error (the wrong file, or
  the wrong --format): exit status 1, the message asks whether this is the
  right file / --format and names errors.jsonl, which holds their reasons;
  no shard, no manifest;
- `empty`: no record at all: exit status 1, "nothing was extracted";
- `record`: the bad records become errors.jsonl lines (line, id, reason
  words), the run goes on, exit status 0 and the good records of the same
  file are extracted.
"""
from __future__ import annotations

import gzip
import json
import lzma
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from rjepa_latent.inputs.data import read_records
from conftest import interrupt_at_shard

G1 = {"id": "good1", "question": "Q", "steps": ["she sold 48 clips", "then 24"]}
G2 = {"id": "good2", "steps": ["in total 72"]}
GOOD = ["good1", "good2"]


def j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def jl(*middle, nl: bytes = b"\n") -> bytes:
    """G1 on line 1, the middle lines (objects or raw bytes) on lines 2.., G2 last."""
    rows = [j(G1), *[m if isinstance(m, bytes) else j(m) for m in middle], j(G2)]
    return nl.join(rows) + nl


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def fifty_mb_step(path: Path) -> None:
    """A 50 MB line (one step of 50 MB), written in pieces, never held as one string here."""
    with open(path, "wb") as f:
        f.write(j(G1) + b"\n" + b'{"id": "huge", "steps": ["')
        piece = b"clips " * (1 << 14)
        for _ in range((50 << 20) // len(piece)):
            f.write(piece)
        f.write(b'"]}\n' + j(G2) + b"\n")


def nul_past_the_sniff(path: Path) -> None:
    """A NUL byte in a line after the first 64 KiB (the sniff sees only good lines)."""
    path.write_bytes(j(G1) + b"\n" + b" \n" * 40000 + b'{"id": "nul", "steps": ["a\x00b"]}\n' + j(G2) + b"\n")


def parquet_named_jsonl(path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "steps": [["x"]]}), path)


@dataclass
class Case:
    name: str
    data: bytes | Callable[[Path], None]
    outcome: str = "record"                     # refused | stopped | empty | record
    errors: dict = field(default_factory=dict)  # record: {line: (id, words of the reason)}
    words: tuple = ()                           # refused / stopped: words of the message on stderr
    file: str = "data.jsonl"
    args: tuple = ()
    good: list = field(default_factory=lambda: list(GOOD))
    up_front: bool = True                       # refused: by the sniff, before any work


SAFETENSORS = struct.pack("<Q", 64) + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(64) + b"\0" * 4
CASES = [
    # ---- files that cannot hold records: refused up front, exit 2, nothing written
    Case("gguf_as_data", b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "refused", file="model.gguf",
         words=("model.gguf", "GGUF model file", "--model")),
    Case("gguf_named_jsonl", b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "refused", words=("GGUF",)),
    Case("safetensors_as_data", SAFETENSORS, "refused", file="model.safetensors",
         words=("safetensors file", "--model")),
    Case("zip_archive", b"PK\x03\x04" + b"\x00" * 40, "refused", words=("zip archive", "unzip")),
    Case("gzip_not_named_gz", gzip.compress(jl()), "refused", words=("gzip-compressed", ".jsonl.gz")),
    Case("xz_compressed", lzma.compress(jl()), "refused", words=("xz-compressed", "xz -d")),
    Case("binary_nul_bytes", bytes(range(256)) * 4, "refused", words=("binary file", "NUL byte at byte 0")),
    Case("nul_in_first_line", b'{"id": "a", "steps": ["x"]}\x00\n', "refused", words=("NUL byte at byte 27",)),
    Case("utf16_with_bom", jl().decode().encode("utf-16"), "refused", words=("UTF-16", "iconv")),
    Case("utf16_without_bom", jl().decode().encode("utf-16-le"), "refused",
         words=("UTF-16 text without a byte order mark", "iconv")),
    Case("latin1_file", '{"id": "café", "steps": ["crème"]}\n'.encode("latin-1"), "refused",
         words=("not UTF-8 text", "line 1 has byte 0xe9 at byte 11", "iconv")),
    Case("csv_file", b"id,question,answer\n1,What?,42\n", "refused",
         words=("not JSON Lines", "'id,question,answer'", "CSV header")),
    Case("prose_text_file", b"Natalia sold clips to 48 of her friends.\nThen she sold half as many.\n",
         "refused", file="notes.txt", words=("notes.txt", "no line starts with '{'")),
    Case("json_array_named_jsonl", b"[\n" + j(G1) + b",\n" + j(G2) + b"\n]\n", "refused",
         words=("its first line is '['", "name it .json")),
    Case("parquet_named_jsonl", parquet_named_jsonl, "refused", words=("Parquet file", "name it .parquet")),
    Case("broken_parquet", b"PAR1 not really", "refused", file="data.parquet",
         words=("not a readable Parquet file",)),
    Case("json_file_of_prose", b"hello world\n", "refused", file="data.json",
         words=("is not JSON", "'hello world")),
    Case("named_gz_not_gzip", jl(), "refused", file="data.jsonl.gz",
         words=("not readable gzip data", "drop the .gz")),
    Case("unknown_gz_kind", gzip.compress(b"a,b\n"), "refused", file="data.csv.gz",
         words=("unknown kind", "only .jsonl.gz and .json.gz")),
    Case("truncated_gzip", gzip.compress(jl(*[{"id": f"r{i}", "steps": ["x"]} for i in range(3000)]))[:-40],
         "refused", file="data.jsonl.gz", words=("damaged or truncated after line 3000", "gzip -t"),
         up_front=False),
    # ---- every record an error: the wrong file or the wrong --format; exit 1, errors.jsonl
    Case("no_known_fields", b"".join(j({"prompt": f"p{i}", "completion": "c"}) + b"\n" for i in range(5)),
         "stopped", words=("all 5 records of data.jsonl are errors", "5 x cannot tell the format",
                           "is this the right file", "--format")),
    Case("wrong_format_flag", jl(), "stopped", args=("--format", "gsm8k"),
         words=("all 2 records", "needs a string '…'", "(now gsm8k)")),
    Case("jsonl_named_json", jl(), "stopped", file="data.json", words=("1 x file is not valid JSON",),
         errors={1: (None, "Extra data: line 2 column 1 (char 76); it looks like JSON Lines")}),
    Case("json_object_not_array", j(G1), "stopped", file="data.json", words=("must be an array",)),
    Case("deep_json_file", deep(100_000), "stopped", file="data.json", words=("the file is nested too deeply",),
         errors={1: (None, "the file is nested too deeply")}),
    Case("all_lines_scalars", b"1\n2\n", "refused", words=("no line starts with '{'", "line 1 reads '1'")),
    Case("all_lines_arrays", b"[1, 2]\n[3]\n", "stopped", words=("2 x a record must be a JSON object, got list",),
         errors={1: (None, "got list"), 2: (None, "got list")}),
    # ---- no record at all: exit 1
    Case("empty_file", b"", "empty"),
    Case("blank_lines_only", b"\n  \n\t\r\n\n", "empty"),
    # ---- bad records among good ones: error lines, the run goes on, exit 0
    Case("bom_at_start", b"\xef\xbb\xbf" + jl()),
    Case("bom_mid_file_concatenated", jl() + b"\xef\xbb\xbf" + j({"id": "g3", "steps": ["x"]}) + b"\n",
         good=GOOD + ["g3"]),
    Case("crlf_line_endings", jl({"id": "g3", "steps": ["x"]}, nl=b"\r\n"), good=["good1", "g3", "good2"]),
    Case("cr_only_line_endings", jl({"id": "g3", "steps": ["x"]}, nl=b"\r"), good=["good1", "g3", "good2"]),
    Case("truncated_utf8", jl(b'{"id": "cut", "steps": ["caf\xc3"]}'),
         errors={2: ("cut", "not valid UTF-8: byte 0xc3 at byte 28 of the line")}),
    Case("latin1_line", jl('{"id": "lat", "steps": ["café"]}'.encode("latin-1")),
         errors={2: ("lat", "not valid UTF-8: byte 0xe9 at byte 28 of the line")}),
    Case("nul_past_the_sniff", nul_past_the_sniff, errors={40002: ("nul", "invalid JSON: Invalid control")}),
    Case("escaped_nul_in_step", jl({"id": "esc", "steps": ["a\u0000b"]}), good=["good1", "esc", "good2"]),
    Case("fifty_mb_line", fifty_mb_step, errors={2: ("huge", "more than --max-tokens 1024")}),
    Case("json_array_line", jl(b"[" + j({"id": "a", "steps": ["x"]}) + b"," + j({"id": "b", "steps": ["y"]}) + b"]"),
         errors={2: (None, "got list of 2 objects (a JSON array of records?")}),
    Case("scalar_line", jl(b'"just a string"', b"null", b"42"),
         errors={2: (None, "got str"), 3: (None, "got NoneType"), 4: (None, "got int")}),
    Case("steps_not_a_list", jl({"id": "s", "steps": {"1": "a"}}), errors={2: ("s", "'steps' must be a list")}),
    Case("step_not_a_string", jl({"id": "s", "steps": ["a", 7]}), errors={2: ("s", "step 2 is not a string (int)")}),
    Case("question_not_a_string", jl({"id": "q", "question": ["Q"], "steps": ["a"]}),
         errors={2: ("q", "'question' must be a string, got list")}),
    Case("answer_not_a_string", jl({"id": "g", "question": "Q", "answer": 42}),
         errors={2: ("g", "gsm8k record needs a string 'answer'")}),
    Case("empty_step_list", jl({"id": "e", "steps": []}), errors={2: ("e", "empty step list")}),
    Case("empty_step", jl({"id": "e", "steps": ["a", ""]}), errors={2: ("e", "step 2 is an empty string")}),
    # a step of only whitespace carries no reasoning: an error like an empty step (it was accepted before)
    Case("whitespace_only_steps", jl({"id": "w", "steps": ["a", "   ", "\t"]}),
         errors={2: ("w", "step 2 is only whitespace")}),
    Case("blank_text", jl({"id": "t", "text": " \n\t "}), errors={2: ("t", "'text' is empty")}),
    Case("duplicate_id", jl({"id": "good1", "steps": ["again"]}),
         errors={2: ("good1", "duplicate id 'good1' (first seen at data.jsonl:1)")}),
    Case("duplicate_int_and_str_id", jl({"id": 5, "steps": ["a"]}, {"id": "5", "steps": ["b"]}),
         errors={3: ("5", "duplicate id '5'")}, good=["good1", "5", "good2"]),
    Case("float_id", jl({"id": 1.5, "steps": ["a"]}), errors={2: (None, "'id' must be a string or an integer, got float")}),
    Case("bool_id", jl({"id": True, "steps": ["a"]}), errors={2: (None, "got bool")}),
    Case("object_id", jl({"id": {"k": 1}, "steps": ["a"]}), errors={2: (None, "got dict")}),
    Case("empty_id", jl({"id": "", "steps": ["a"]}), errors={2: (None, "'id' is empty")}),
    Case("deep_nesting_100k", jl(b'{"id": "deep", "steps": ["a"], "x": ' + deep(100_000) + b"}"),
         errors={2: ("deep", "nested too deeply")}),
    Case("deep_nesting_in_steps", jl(b'{"id": "d2", "steps": ' + deep(5000) + b"}"),
         errors={2: ("d2", "nested too deeply")}),
    # one rule for every input format: a non-finite number in a carried field is a value,
    # stored as null and named in nonfinite_fields (tests/test_integrity.py); as a step it is
    # the usual type error
    Case("nan_field", jl(b'{"id": "n", "steps": ["a"], "score": NaN}'), good=["good1", "n", "good2"]),
    Case("infinity_fields", jl(b'{"id": "i", "steps": ["a"], "s": Infinity}', b'{"id": "m", "steps": ["a"], "s": -Infinity}'),
         good=["good1", "i", "m", "good2"]),
    Case("nan_step", jl(b'{"id": "n", "steps": ["a", NaN]}'), errors={2: ("n", "step 2 is not a string (float)")}),
    Case("number_overflows_float", jl(b'{"id": "o", "steps": ["a"], "s": 1e999}'),
         errors={2: ("o", "number 1e999 is out of the range of a float")}),
    Case("huge_integer", jl(b'{"id": "h", "steps": ["a"], "s": ' + b"9" * 5000 + b"}"),
         errors={2: ("h", "invalid JSON: Exceeds the limit")}),
    Case("leading_zero_number", jl(b'{"id": "z", "steps": ["a"], "s": 012}'), errors={2: ("z", "invalid JSON")}),
    Case("text_and_record_text", jl({"id": "both", "steps": ["a"], "text": "T", "record_text": "R"}),
         good=["good1", "both", "good2"]),
    Case("over_the_context", jl({"id": "long", "steps": [" ".join(["word"] * 1200)]}),
         errors={2: ("long", "more than --max-tokens 1024")}),
    Case("truncated_last_line", j(G1) + b"\n" + j(G2) + b'\n{"id": "cut", "steps": ["a', errors={3: ("cut", "invalid JSON")}),
    Case("trailing_comma", jl(b'{"id": "tc", "steps": ["a"],}'), errors={2: ("tc", "invalid JSON")}),
    Case("two_objects_one_line", jl(b'{"id": "x1", "steps": ["a"]}{"id": "x2", "steps": ["b"]}'),
         errors={2: ("x1", "invalid JSON: Extra data")}),
    Case("raw_tab_in_string", jl(b'{"id": "tab", "steps": ["a\tb"]}'), errors={2: ("tab", "Invalid control character")}),
    Case("lone_surrogate", jl(b'{"id": "sur", "steps": ["a \\ud800 b"]}'), errors={2: ("sur", "lone UTF-16 surrogate")}),
    Case("messages_without_chat", jl({"id": "msg", "messages": [{"role": "user", "content": "hi"}]}),
         errors={2: ("msg", "pass --chat")}),
    Case("bad_step_ranges", jl({"id": "r", "text": "abc", "step_ranges": [[2, 9]]}),
         errors={2: ("r", "step_ranges[0] = [2, 9] is not a non-empty range")}),
]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, model_dir, tmp_path, capsys):
    src = tmp_path / case.file
    if callable(case.data):
        case.data(src)
    else:
        src.write_bytes(case.data)
    out = tmp_path / "run"
    rc = cli_main(["extract", str(src), "--model", str(model_dir), "--device", "cpu", "--no-progress",
                   "--out", str(out), *case.args])
    std = capsys.readouterr()
    assert "Traceback" not in std.err
    if case.outcome == "refused":
        assert rc == 2, std.err
        assert f"input file {str(src)!r}" in std.err, std.err
        assert ("nothing was written" in std.err) == case.up_front, std.err
        for w in case.words:
            assert w in std.err, (w, std.err)
        assert not out.exists()
        return
    if case.outcome == "stopped":
        assert rc == 1, std.err
        for w in ("stopped before extracting anything", "is this the right file", str(out / "errors.jsonl"),
                  *case.words):
            assert w in std.err, (w, std.err)
        assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl"]   # no shard, no manifest
        errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
        assert errors and all(set(e) == {"id", "source", "line", "reason"} for e in errors)
        got = {e["line"]: e for e in errors}
        for line, (rid, words) in case.errors.items():
            assert got[line]["id"] == rid and words in got[line]["reason"], got[line]
        return
    if case.outcome == "empty":
        assert rc == 1 and "nothing was extracted: the inputs hold no records" in std.err, std.err
        assert "nothing was written" in std.err and not out.exists()   # no "complete" empty run
        return
    assert rc == 0, std.err
    store = rl.open_latents(out)
    assert store.ids == case.good
    got = {e["line"]: e for e in store.errors}
    assert sorted(got) == sorted(case.errors), store.errors
    for line, (rid, words) in case.errors.items():
        e = got[line]
        assert e["id"] == rid and e["source"] == case.file and words in e["reason"], e
    if case.errors:
        assert "errors by reason:" in std.out and str(out / "errors.jsonl") in std.out, std.out
    else:
        assert "errors by reason" not in std.out


def test_the_table_is_broad():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert {c.outcome for c in CASES} == {"refused", "stopped", "empty", "record"}


def test_gz_inputs_read_like_plain_and_are_fingerprinted_by_their_bytes(model_dir, tmp_path):
    plain = jl({"id": "g3", "steps": ["x"]})
    (tmp_path / "d.jsonl").write_bytes(plain)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(plain, mtime=0))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(b"[" + j(G1) + b"]", mtime=0))
    args = ["extract", "--model", str(model_dir), "--device", "cpu", "--no-progress"]
    assert cli_main([*args, str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "p")]) == 0
    assert cli_main([*args, str(tmp_path / "d.jsonl.gz"), "--out", str(tmp_path / "z")]) == 0
    p, z = rl.open_latents(tmp_path / "p"), rl.open_latents(tmp_path / "z")
    assert z.ids == p.ids == ["good1", "g3", "good2"]
    for a, b in zip(p, z):
        assert (a.latents == b.latents).all() and a.meta["text"] == b.meta["text"]
    (inp,) = json.loads((tmp_path / "z" / "manifest.json").read_text())["config"]["inputs"]
    import hashlib
    assert inp == {"name": "d.jsonl.gz", "bytes": (tmp_path / "d.jsonl.gz").stat().st_size,
                   "sha256": hashlib.sha256((tmp_path / "d.jsonl.gz").read_bytes()).hexdigest()}
    assert cli_main([*args, str(tmp_path / "a.json.gz"), "--out", str(tmp_path / "a")]) == 0
    assert rl.open_latents(tmp_path / "a").ids == ["good1"]
    # a record without an id is named after the file without .jsonl.gz
    (tmp_path / "n.jsonl.gz").write_bytes(gzip.compress(b'{"steps": ["x"]}\n'))
    assert [r.id for r in read_records([tmp_path / "n.jsonl.gz"])] == ["n:1"]


def test_carried_text_beside_record_text_loses_nothing(model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_bytes(jl({"id": "both", "steps": ["a"], "text": "T", "record_text": "R"}))
    assert cli_main(["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 0
    meta = rl.open_latents(tmp_path / "run")["both"].meta
    assert meta["record_text"] == "R" and meta["record_record_text"] == "T" and meta["text"] == "a"


def test_the_sniff_is_fast_on_a_big_binary_file(tmp_path, model_dir, capsys):
    import time
    big = tmp_path / "weights.jsonl"
    with open(big, "wb") as f:
        f.write(b"GGUF\x03\x00\x00\x00")
        f.truncate(2 << 30)      # 2 GiB, sparse: hashing it would take seconds
    t = time.perf_counter()
    assert cli_main(["extract", str(big), "--model", str(model_dir), "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - t < 1.0 and "GGUF" in capsys.readouterr().err


def test_early_stop_after_the_first_1000_errors_and_a_later_good_record(model_dir, tmp_path, capsys):
    bad = b"".join(j({"prompt": f"p{i}"}) + b"\n" for i in range(1000))
    (tmp_path / "d.jsonl").write_bytes(bad + j(G1) + b"\n")
    assert cli_main(["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "the first 1000 records of d.jsonl are errors (1000 x cannot tell the format" in err
    assert len((tmp_path / "run" / "errors.jsonl").read_text().splitlines()) == 1000
    # the same --out with the right file starts the run normally
    (tmp_path / "g.jsonl").write_bytes(jl())
    assert cli_main(["extract", str(tmp_path / "g.jsonl"), "--model", str(model_dir), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert rl.open_latents(tmp_path / "run").ids == GOOD and rl.open_latents(tmp_path / "run").errors == []
    assert (tmp_path / "run" / "errors.jsonl").read_text() == ""
    # one good record among the first 1000: no early stop, the run goes on
    (tmp_path / "e.jsonl").write_bytes(bad[: bad.rindex(b"{")] + j(G1) + b"\n")
    assert cli_main(["extract", str(tmp_path / "e.jsonl"), "--model", str(model_dir), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "999 errors" in out and "errors by reason: 999 x cannot tell the format from the fields ['…']. Each" in out


def _interrupted_then_resumed(model_dir, tmp_path, capsys, monkeypatch, n_rows: int,
                              extra: list[str]) -> str:
    """`extract` of n_rows one-step records in shards of 2, interrupted (exit 130)
    when shard 2 starts, then resumed to the end: the resumed run's stderr."""
    from rjepa_latent.run import local as rl_local
    rows = [{"id": f"r{i}", "steps": [f"step {i}"]} for i in range(n_rows)]
    (tmp_path / "d.jsonl").write_bytes(b"".join(j(r) + b"\n" for r in rows))
    args = ["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
            "--out", str(tmp_path / "run"), "--shard-size", "2", *extra]
    compute = interrupt_at_shard(monkeypatch, 2)
    assert cli_main(args) == 130
    monkeypatch.setattr(rl_local._Runner, "_compute", compute)
    capsys.readouterr()
    assert cli_main(args) == 0
    return capsys.readouterr().err


def test_resume_says_what_it_keeps_and_what_remains(model_dir, tmp_path, capsys, monkeypatch):
    err = _interrupted_then_resumed(model_dir, tmp_path, capsys, monkeypatch, 6, ["--no-progress"])
    # records are streamed: what remains is known once they are read, so it is said at the end
    assert f"resuming {tmp_path / 'run'}: keeping 2 finished shards (4 records)" in err
    assert f"resumed {tmp_path / 'run'}: kept 2 finished shards (4 records); 1 shard (2 records) remained" in err


def test_exit_1_when_every_record_fails_after_reading(model_dir, tmp_path, capsys):
    """Records that read well but all fail later (here: over --max-tokens) are no
    early stop (that is decided on reading); the run ends, nothing extracted: exit 1."""
    (tmp_path / "d.jsonl").write_bytes(jl())
    args = ["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run"), "--max-tokens", "3"]
    assert cli_main(args) == 1
    std = capsys.readouterr()
    assert "nothing was extracted: all 2 records are errors" in std.err and "new --out" in std.err
    # one reason in full (the kinds hide their particulars), and where all of them are
    assert "the first in full: data.jsonl line 1: text has " in std.err.replace("d.jsonl", "data.jsonl")
    assert f"every reason is in {tmp_path / 'run' / 'errors.jsonl'}" in std.err
    assert "run: 0 items, 0 steps, 2 errors; 1 shard written this run" in std.out, std.out
    assert "[0/1]" not in std.out
    assert "0 items" in std.out and ("errors by reason: 1 x text has N characters, so more than --max-tokens N "
                                     "tokens; 1 x text has N tokens, more than --max-tokens N. Each") in std.out
    assert cli_main(args) == 1          # the finished run says the same
    s = rl.extract_dataset(tmp_path / "d.jsonl", str(model_dir), tmp_path / "run", max_tokens=3,
                           progress=False, device="cpu")
    assert s["items"] == 0 and s["records"] == 2 and s["error_kinds"] == {
        "text has N characters, so more than --max-tokens N tokens": 1,
        "text has N tokens, more than --max-tokens N": 1}


def test_error_kinds_group_reasons_without_their_particulars():
    from rjepa_latent.store.files import error_kind
    from rjepa_latent.run.driver import error_kinds
    from rjepa_latent.run.report import format_errors
    assert error_kind("duplicate id 'a:1' (first seen at d.jsonl:1)") == "duplicate id '…'"
    assert error_kind("step 12 is an empty string") == "step N is an empty string"
    assert error_kind("invalid JSON: Expecting value: line 1 column 5 (char 4)") == "invalid JSON"
    reasons = [f"kind{c} {i}" for c in "abcdefg" for i in range(ord(c) - 96)]
    kinds = error_kinds([{"reason": r} for r in reasons])
    line = format_errors({"errors": len(reasons), "error_kinds": dict(kinds.most_common()),
                          "errors_file": "run/errors.jsonl"})
    assert line == ("\n  errors by reason: 7 x kindg N; 6 x kindf N; 5 x kinde N; 4 x kindd N; 3 x kindc N; "
                    "3 more of 2 other kinds. Each record's reason is in run/errors.jsonl")
    assert format_errors({"errors": 0, "error_kinds": {}, "errors_file": "x"}) == ""


def test_an_early_stop_shows_one_reason_in_full(model_dir, tmp_path, capsys):
    """The kinds hide the particulars ("fields ['…', '…']"); the message also
    gives the first reason in full, so the field names are seen."""
    (tmp_path / "d.jsonl").write_bytes(b'{"a": 1, "b": 2}\n{"a": 3, "b": 4}\n')
    assert cli_main(["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "cannot tell the format from the fields ['…', '…']" in err
    assert "The first in full: d.jsonl line 1: cannot tell the format from the fields ['a', 'b']" in err
    assert f"in {tmp_path / 'run' / 'errors.jsonl'}" in err


def test_a_resumed_progress_bar_counts_the_kept_records(model_dir, tmp_path, capsys, monkeypatch):
    """--limit 6 in shards of 2, stopped after 2 shards: the resumed bar starts
    at 4 and ends at 6/6 (100%), not at 2/6."""
    err = _interrupted_then_resumed(model_dir, tmp_path, capsys, monkeypatch, 9, ["--limit", "6"])
    assert "4/6" in err and "6/6" in err and "100%" in err, err
    assert "0/6" not in err and "2/6" not in err, err


def test_layers_out_of_range_are_refused_before_the_model_load(model_dir, tmp_path, capsys, monkeypatch):
    """--layers 99 is checked against config.json: exit 2, the valid range named,
    and no Model is built (no weights read)."""
    from rjepa_latent.run import local as rl_local
    (tmp_path / "d.jsonl").write_bytes(jl())

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --layers was checked")
    monkeypatch.setattr(rl_local, "Model", no_load)
    rc = cli_main(["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
                   "--no-progress", "--out", str(tmp_path / "run"), "--layers", "99"])
    err = capsys.readouterr().err
    assert rc == 2 and "layer index 99 is out of range" in err and "-4..3" in err, err
    assert not (tmp_path / "run").exists()


def test_disk_full_names_the_path_and_the_space_needed(model_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC while a shard is committed: exit 2, the message names the file,
    the bytes free there and about what a shard takes, and says the run resumes."""
    import errno
    import os
    from rjepa_latent.run import worker as rl_worker
    rows = [{"id": f"r{i}", "steps": [f"step {i}"]} for i in range(6)]
    (tmp_path / "d.jsonl").write_bytes(b"".join(j(r) + b"\n" for r in rows))
    commit = rl_worker.ShardWorker.commit

    def full(self, job):   # the disk fills once the first shard is committed
        if list((tmp_path / "run").glob("shard-*.safetensors")):
            path = tmp_path / "run" / "shard-00001.safetensors"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return commit(self, job)
    monkeypatch.setattr(rl_worker.ShardWorker, "commit", full)
    rc = cli_main(["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cpu",
                   "--no-progress", "--out", str(tmp_path / "run"), "--shard-size", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"no space left on the disk of {tmp_path / 'run' / 'shard-00001.safetensors'}" in err, err
    assert "bytes free" in err and "a shard of this run takes about" in err and "resume" in err
    assert "[Errno 28]" not in err


def test_device_errors_speak_the_cli_spelling(model_dir, tmp_path, capsys, monkeypatch):
    """The engine's DeviceError says `use device='cpu'` (the Python spelling);
    the command line says `--device cpu`."""
    from rjepa_latent.run import local as rl_local

    def no_gpu(*a, **k):
        raise rl.DeviceError("cuda:0: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and "
                             "nvidia-smi, or use device='cpu')")
    monkeypatch.setattr(rl_local, "Model", no_gpu)
    (tmp_path / "d.jsonl").write_bytes(jl())
    rc = cli_main(["extract", str(tmp_path / "d.jsonl"), "--model", str(model_dir), "--device", "cuda",
                   "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "or use --device cpu)" in err and "device='cpu'" not in err, err

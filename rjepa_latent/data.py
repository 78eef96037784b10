"""Dataset readers: JSONL / JSON-array files of chains of thought -> records
(text + the exact character range of each reasoning step).

Design choices:
- One record at a time, in input order, each with its global index (its
  position among all records of all input files, blank lines excluded), its
  file and its line (for a JSON array: element index + 1). The index decides
  which shard a record belongs to, so it must not depend on anything but the
  input bytes.
- A bad record never raises: it becomes an `ErrorRecord` (id if known, line,
  a reason a person can act on) that the store writes to `errors.jsonl`.
- The text fed to the model is built by a `Template` that records each step's
  character range while it builds the string, so ranges are exact by
  construction (no searching for the step in the text afterwards).
- Formats: `cot` {id, question?, steps}, `gsm8k` {question, answer} (steps =
  non-blank lines of answer), `text` {id, text} (steps start at a marker
  regex, or a `Segmenter` rule, or the record's own `step_ranges`),
  `messages` {id, messages} (OpenAI chat format, needs a chat template);
  `auto` picks per record from its fields.
- Inputs: `.jsonl`, `.json` (an array) and `.parquet` files (`.jsonl.gz`,
  `.json.gz` decompressed as read), or an HF `datasets.Dataset`. Each file
  is sniffed first (`sniff_input`: binary, not UTF-8, not JSON are refused
  naming the file); JSON is read strictly (no NaN / Infinity) and nesting
  too deep for the parser is an error record, never a RecursionError.
  Parquet and Dataset rows go through Arrow's own `to_pylist`, so the
  field rules are the JSONL ones. A Dataset's identity
  is a hash of its rows as read (`dataset_fingerprint`), not its
  `_fingerprint` (random when `datasets` cannot hash a transform).
- With a `Chat`, the text is the model's chat template rendered over
  [system?, user: question, assistant: steps] (`chat.ChatTemplate.render_steps`
  gives each step's exact range in it); a template that fails on one record
  makes that record an error, one that fails on a plain conversation is
  refused up front (`Chat.for_model`).
"""
from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import math
import os
import re
import string
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .chat import ChatTemplate, ChatTemplateError, load_chat_template, steps_of_messages

FORMATS = ("auto", "cot", "gsm8k", "text", "messages")
SEGMENT_RULES = ("auto", "lines", "paragraphs", "sentences", "regex:PATTERN", "ranges")
_NAMED_RULES = ("auto", "lines", "paragraphs", "sentences", "ranges")
DATASET_SOURCE = "dataset"   # the source name of a datasets.Dataset's records
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_TEMPLATE = "{question}\n{steps}"
DEFAULT_STEP_SEPARATOR = "\n"
DEFAULT_STEP_REGEX = r"Step\s+\d+:"

ID_FIELDS = ("id", "cot_id")
QUESTION_FIELDS = ("question", "statement", "problem")
# fields consumed to build the text; everything else scalar is carried as metadata
_CONSUMED = {"cot": set(ID_FIELDS) | set(QUESTION_FIELDS) | {"steps"},
             "gsm8k": set(ID_FIELDS) | {"question", "answer"},
             "text": set(ID_FIELDS) | {"text", "step_ranges"},
             "messages": set(ID_FIELDS) | {"messages"}}
# keys of the shard jsonl that carried fields must not overwrite
RESERVED_META = ("id", "num_steps", "num_tokens", "text", "source", "line")


@dataclass
class Record:
    """A good record: the model's text and each step's [start, end) char range."""
    index: int
    id: str
    text: str
    steps: list[tuple[int, int]]
    meta: dict
    source: str
    line: int


@dataclass
class ErrorRecord:
    """A record that cannot be processed; it goes to errors.jsonl."""
    index: int
    id: str | None
    source: str
    line: int
    reason: str

    def to_json(self) -> dict:
        return {"id": self.id, "source": self.source, "line": self.line, "reason": self.reason}


class _BadRecord(Exception):
    """Internal: raised while converting one record, caught into an ErrorRecord."""


@dataclass(frozen=True)
class Template:
    """How question and steps become one text.

    `template` is a format string with exactly one `{steps}` field and at most
    one `{question}` field (use `{{`/`}}` for literal braces); the steps are
    joined by `step_separator`. A record without a question (or an empty one)
    uses the steps alone, without the template's surrounding text, so no
    dangling separator is fed to the model.
    """
    template: str = DEFAULT_TEMPLATE
    step_separator: str = DEFAULT_STEP_SEPARATOR
    _parts: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        parts = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise ValueError(f"template {self.template!r} is not a valid format string: {e}") from None
        for literal, name, spec, conv in parsed:
            if literal:
                parts.append(("lit", literal))
            if name is None:
                continue
            if name not in ("question", "steps") or spec or conv:
                raise ValueError(f"template {self.template!r}: unknown field {{{name}}}; "
                                 "only {question} and {steps} are allowed, without format specs")
            parts.append(("field", name))
        names = [p[1] for p in parts if p[0] == "field"]
        if names.count("steps") != 1 or names.count("question") > 1:
            raise ValueError(f"template {self.template!r} must contain {{steps}} exactly once "
                             "and {question} at most once")
        object.__setattr__(self, "_parts", tuple(parts))

    def to_json(self) -> dict:
        return {"template": self.template, "step_separator": self.step_separator}

    def render(self, question: str | None, steps: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """Build the text; return it with each step's [start, end) character range."""
        parts = self._parts if question else (("field", "steps"),)
        out: list[str] = []
        pos = 0
        ranges: list[tuple[int, int]] = []
        for kind, value in parts:
            if kind == "lit":
                chunk = value
            elif value == "question":
                chunk = question or ""
            else:
                for i, step in enumerate(steps):
                    if i:
                        out.append(self.step_separator)
                        pos += len(self.step_separator)
                    ranges.append((pos, pos + len(step)))
                    out.append(step)
                    pos += len(step)
                continue
            out.append(chunk)
            pos += len(chunk)
        return "".join(out), ranges


# ---------------------------------------------------------------- segmentation

_LINE_BREAK = re.compile(r"\r\n|\n|\r")
_ANNOTATION = re.compile(r"<<[^<>]*>>")   # a GSM8K calculator annotation: <<48/2=24>>
# a sentence ends after . ! ? or … (then closing quotes/brackets) before whitespace or the
# end of the text, or after a CJK full stop / exclamation / question mark (no space needed)
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]}\u00bb]*(?=\s|$)"
                           r"|[\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]}\u00bb\u300d\u300f]*")


def _trim(text: str, a: int, b: int) -> tuple[int, int] | None:
    """[a, b) without its outer whitespace (str.strip's), None if nothing is left."""
    part = text[a:b]
    core = part.strip()
    if not core:
        return None
    a += len(part) - len(part.lstrip())
    return a, a + len(core)


def _line_ranges(text: str) -> Iterator[tuple[int, int]]:
    """Each line's [start, end) without its line break (\\r\\n, \\n or \\r)."""
    pos = 0
    for m in _LINE_BREAK.finditer(text):
        yield pos, m.start()
        pos = m.end()
    yield pos, len(text)


def _paragraph_ranges(text: str) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    open_ = False
    for a, b in _line_ranges(text):
        t = _trim(text, a, b)
        if t is None:
            open_ = False      # a blank (or whitespace-only) line ends the paragraph
        elif open_:
            out[-1][1] = t[1]
        else:
            out.append(list(t))
            open_ = True
    return [(a, b) for a, b in out]


def _sentence_ranges(text: str) -> list[tuple[int, int]]:
    out = []
    for a, b in _paragraph_ranges(text):
        start = a
        for m in _SENTENCE_END.finditer(text, a, b):
            t = _trim(text, start, m.end())
            if t is not None:
                out.append(t)
            start = m.end()
        t = _trim(text, start, b)
        if t is not None:
            out.append(t)
    return out


def _marker_ranges(text: str, marker: re.Pattern) -> list[tuple[int, int]]:
    """Steps start at each match of `marker` and run to the next one, trailing
    whitespace excluded; text before the first match is context; no match: one
    step over the text without its outer whitespace."""
    starts = [m.start() for m in marker.finditer(text)]
    if not starts:
        t = _trim(text, 0, len(text))
        return [t] if t else []
    ends = starts[1:] + [len(text)]
    out = [(s, s + len(text[s:e].rstrip())) for s, e in zip(starts, ends)]
    for k, (a, b) in enumerate(out):
        if a == b:
            raise _BadRecord(f"step {k + 1} is empty: the step regex {marker.pattern!r} matched at "
                             f"character {a} with nothing but whitespace before the next match")
    return out


@dataclass(frozen=True)
class Segmenter:
    """How a free text (a `text` record's `text`, a `gsm8k` record's `answer`, a
    `messages` record's last assistant turn) becomes steps.

    `auto`: today's rule of each format (`text`: the `step_regex` markers;
    `gsm8k`: the answer's non-blank lines as they are; `messages`: the trimmed
    non-blank lines); `lines`: each non-blank line (`\\r\\n`, `\\n`, `\\r` end a
    line); `paragraphs`: runs of non-blank lines separated by blank
    (whitespace-only) lines; `sentences`: within each paragraph, a sentence
    ends after `.`, `!`, `?` or `…` (plus closing quotes or brackets) followed
    by whitespace or the end, or after `。`, `！`, `？`; `regex:PATTERN`: steps
    start at each match of PATTERN (the `text` format's marker rule);
    `ranges`: every record must give its own `step_ranges`. Every rule but
    `auto` on gsm8k answers excludes each step's outer whitespace.
    """
    rule: str = "auto"
    step_regex: str = DEFAULT_STEP_REGEX
    _marker: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str) or not (self.rule in _NAMED_RULES or self.rule.startswith("regex:")):
            raise ValueError(f"segment {self.rule!r} is not one of {', '.join(SEGMENT_RULES)}")
        pattern = self.rule[len("regex:"):] if self.rule.startswith("regex:") else self.step_regex
        if not pattern:
            raise ValueError("segment 'regex:' needs a pattern after the colon")
        try:
            object.__setattr__(self, "_marker", re.compile(pattern))
        except re.error as e:
            what = "segment" if self.rule.startswith("regex:") else "step_regex"
            raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None

    def split(self, text: str) -> list[tuple[int, int]]:
        """The steps' [start, end) ranges in `text` under an explicit rule (not auto, not ranges)."""
        if self.rule == "lines":
            out = [t for t in (_trim(text, a, b) for a, b in _line_ranges(text)) if t]
        elif self.rule == "paragraphs":
            out = _paragraph_ranges(text)
        elif self.rule == "sentences":
            out = _sentence_ranges(text)
        else:
            out = _marker_ranges(text, self._marker)
        if not out:
            raise _BadRecord(f"empty step list (--segment {self.rule} finds no step in a blank text)")
        return out


def _given_ranges(obj: dict, text: str) -> list[tuple[int, int]]:
    """A record's own `step_ranges`: [[start, end), ...] in characters (code points) of
    `text`, each non-empty and inside it, in order, not overlapping."""
    given = obj["step_ranges"]
    if not isinstance(given, list) or not given:
        raise _BadRecord("'step_ranges' must be a non-empty list of [start, end] pairs")
    out, prev = [], 0
    for k, r in enumerate(given):
        if not (isinstance(r, (list, tuple)) and len(r) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise _BadRecord(f"step_ranges[{k}] must be a pair of integers [start, end], got {r!r}")
        a, b = r
        if not 0 <= a < b <= len(text):
            raise _BadRecord(f"step_ranges[{k}] = [{a}, {b}] is not a non-empty range inside 'text' "
                             f"({len(text)} characters; ranges count code points, end excluded)")
        if a < prev:
            raise _BadRecord(f"step_ranges[{k}] = [{a}, {b}] starts before the end of step_ranges[{k - 1}] "
                             f"({prev}): ranges must be in order and must not overlap")
        out.append((a, b))
        prev = b
    return out


def remove_annotations(text: str) -> tuple[str, Callable[[int], int]]:
    """`text` without GSM8K calculator annotations (`<<48/2=24>>`), and the map
    from a character position in `text` to its position in the result (a
    position inside an annotation maps to where the annotation was)."""
    cuts = [(m.start(), m.end()) for m in _ANNOTATION.finditer(text)]
    if not cuts:
        return text, lambda pos: pos
    starts = [a for a, _ in cuts]
    removed_before = [0]
    for a, b in cuts:
        removed_before.append(removed_before[-1] + b - a)
    out = "".join(text[b0:a1] for (_, b0), (a1, _) in zip([(0, 0)] + cuts, cuts + [(len(text), 0)]))

    def where(pos: int) -> int:
        k = bisect.bisect_right(starts, pos) - 1     # the last annotation starting at or before pos
        if k < 0:
            return pos
        a, b = cuts[k]
        return a - removed_before[k] if pos < b else pos - removed_before[k + 1]
    return out, where


# ---------------------------------------------------------------- chat templates

_PROBE = ("What is 1 + 1?", ["First step of the probe.", "Second step of the probe."], "2")


@dataclass(frozen=True)
class Chat:
    """Render records through a chat template: [system?, user: question,
    assistant: steps]; with `think`, the steps are the assistant's reasoning
    (`reasoning_content`) and the record's `answer` its content."""
    template: ChatTemplate
    think: bool = False
    system: str | None = None

    @classmethod
    def for_model(cls, path: str | os.PathLike, think: bool = False, system: str | None = None) -> "Chat":
        """The model's own template (`chat.load_chat_template`), refused up front
        (ChatTemplateError) when it cannot render a plain conversation with these
        options or does not show the steps (e.g. --chat-think with a template that
        drops the reasoning)."""
        if system is not None and (not isinstance(system, str) or not system):
            raise ValueError(f"system must be a non-empty string, got {system!r}")
        c = cls(load_chat_template(path), bool(think), system)
        question, steps, answer = _PROBE
        try:
            c._render(question, *_joined(steps, "\n"), answer)
        except _BadRecord as e:
            options = ", ".join(o for o, on in (("--chat-think", think), ("--system", system)) if on)
            raise ChatTemplateError(f"the model's chat template cannot render a plain conversation"
                                    f"{' with ' + options if options else ''}: {e}") from None
        return c

    def to_json(self) -> dict:
        ident = json.dumps({"source": self.template.source, "special_tokens": self.template.special_tokens},
                           sort_keys=True, ensure_ascii=False)
        return {"chat": True, "chat_think": self.think, "system": self.system,
                "chat_template_sha256": hashlib.sha256(ident.encode("utf-8")).hexdigest()}

    def _render(self, question: str | None, body: str, ranges: list[tuple[int, int]],
                answer: str | None) -> tuple[str, list[tuple[int, int]]]:
        msgs: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": question or ""})
        if self.think:
            msgs.append({"role": "assistant", "reasoning_content": body, "content": answer or ""})
        else:
            msgs.append({"role": "assistant", "content": body})
        return self.render_steps(msgs, len(msgs) - 1, "reasoning_content" if self.think else "content", ranges)

    def render_steps(self, msgs: list[dict], idx: int, field_: str,
                     ranges: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        try:
            return self.template.render_steps(msgs, idx, field_, ranges)
        except ChatTemplateError as e:
            raise _BadRecord(str(e)) from None
        except Exception as e:   # the template is foreign code: whatever it raises is this record's error
            raise _BadRecord(f"{self.template.where}: the chat template failed on this record: "
                             f"{type(e).__name__}: {e}") from None


def _joined(steps: list[str], separator: str) -> tuple[str, list[tuple[int, int]]]:
    return Template("{steps}", separator).render(None, steps)


# ---------------------------------------------------------------- reading files

class InputFileError(ValueError):
    """A data file that is not records at all (binary, not UTF-8, not JSON):
    refused up front, naming the file and what it looks like."""


SNIFF_BYTES = 1 << 16   # how much of each data file is looked at before any work
GZ_SUFFIXES = (".jsonl.gz", ".json.gz")
_DATA_HINT = "DATA takes .jsonl, .json (an array), .parquet / .pq, .jsonl.gz or .json.gz files of records"
# magic bytes -> (what it is, what to do); Parquet has its own suffix, gzip its own when named .gz
_MAGIC = (
    (b"GGUF", "a GGUF model file", "pass it as --model, not as data"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .bin / .pt checkpoint is one)",
     "unzip it and pass the records inside"),
    (b"\x1f\x8b", "gzip-compressed data", "name it .jsonl.gz or .json.gz to have it read as such"),
    (b"PAR1", "a Parquet file", "name it .parquet"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it (xz -d)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it (zstd -d)"),
    (b"BZh", "bzip2-compressed data", "decompress it (bunzip2)"),
    (b"\x89PNG", "a PNG image", ""), (b"%PDF", "a PDF document", ""),
    (b"\x7fELF", "an executable (ELF)", ""),
    (b"\xff\xfe", "UTF-16 text (little-endian byte order mark)", "convert it: iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 text (big-endian byte order mark)", "convert it: iconv -f UTF-16 -t UTF-8"),
)
_BLANK = " \t\n\r\x0b\x0c"            # what a blank line may hold (ASCII whitespace, as before)
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")   # an undecodable byte, under errors="surrogateescape"


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _kind(path: Path) -> str:
    """'parquet', 'json' or 'jsonl' (any other suffix is read as JSON Lines, as before)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "json" if name.endswith((".json", ".json.gz")) else "jsonl"


def source_stem(name: str) -> str:
    """The default-id prefix of a source: its file name without the suffix (`.gz` too)."""
    if name == DATASET_SOURCE:
        return name
    p = Path(name)
    return Path(p.stem).stem if p.name.lower().endswith(GZ_SUFFIXES) else p.stem


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")


def _refuse(path: Path, what: str, todo: str = "") -> InputFileError:
    return InputFileError(f"input file {str(path)!r} {what}; {todo + '; ' if todo else ''}{_DATA_HINT}; "
                          "nothing was written")


def sniff_input(path: Path) -> None:
    """Refuses (InputFileError) a data file that cannot hold records, from its
    first 64 KiB (decompressed, for .gz): a known binary magic (GGUF,
    safetensors, zip, gzip not named .gz, ...), NUL bytes, no UTF-8 line, or
    no line that starts like JSON. Records in a file that passes are judged
    one by one (a bad one is an error record)."""
    kind = _kind(path)
    if kind == "parquet":
        _open_parquet(path)
        return
    if _is_gz(path) and not path.name.lower().endswith(GZ_SUFFIXES):
        raise _refuse(path, "is compressed data of an unknown kind", "only .jsonl.gz and .json.gz are read")
    try:
        with _open_bytes(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        raise _refuse(path, f"is named .gz but is not readable gzip data ({e})",
                      "compress it with gzip, or drop the .gz from its name") from None
    cut = len(head) == SNIFF_BYTES      # the sample may end inside a line
    for magic, what, todo in _MAGIC:
        if head.startswith(magic):
            raise _refuse(path, f"is not JSON text: it starts with {magic[:4]!r}, the mark of {what}", todo)
    if len(head) >= 10 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 31):
        raise _refuse(path, "is not JSON text: it is a safetensors file (model weights)",
                      "pass its checkpoint directory as --model, not as data")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    nul = head.find(b"\x00")
    if nul >= 0:
        odd = head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4
        what = ("looks like UTF-16 text without a byte order mark (NUL bytes every other byte)" if odd
                else f"is a binary file, not JSON text (a NUL byte at byte {nul})")
        raise _refuse(path, what, "convert it: iconv -f UTF-16 -t UTF-8" if odd else "")
    lines = re.split(rb"\r\n|\n|\r", head)
    if cut and len(lines) > 1:
        lines.pop()                      # an incomplete last line
    lines = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip(_BLANK.encode())]
    if not lines:
        return                           # empty, or blank lines only: no records
    decoded, first_bad, last = [], None, lines[-1][0]
    for i, ln in lines:
        try:
            decoded.append((i, ln.decode("utf-8")))
        except UnicodeDecodeError as e:
            if cut and i == last and e.reason == "unexpected end of data":
                decoded.append((i, ln[:e.start].decode("utf-8")))   # a character cut by the sample
            elif first_bad is None:
                first_bad = (i, e)
    if not decoded:
        i, e = first_bad
        raise _refuse(path, f"is not UTF-8 text: line {i} has byte 0x{e.object[e.start]:02x} at byte "
                            f"{e.start} (Latin-1 or Windows-1252 text?)",
                      "convert it to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8")
    first = decoded[0][1].lstrip(_BLANK)
    if kind == "json":
        if not first.startswith(("[", "{")):
            raise _refuse(path, f"is not JSON: it starts with {first[:40]!r}", "a .json input is one array "
                          "of record objects")
        return
    if first.rstrip(_BLANK) == "[":
        raise _refuse(path, "is not JSON Lines: its first line is '[' (a JSON array spread over lines)",
                      "name it .json to read it as one array of records")
    if not any(t.lstrip(_BLANK).startswith(("{", "[")) for _, t in decoded):
        what = f"is not JSON Lines: no line starts with '{{' (line {decoded[0][0]} reads {first[:40]!r}"
        what += ", a CSV header?)" if "," in first and "{" not in first else ")"
        raise _refuse(path, what, "each line must be one JSON object (a record)")


def _json_number(s: str) -> float:
    """JSON float hook: a number too large for a float (1e999) is not let through as inf."""
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s[:40]} is out of the range of a float")
    return v


def _json_constant(name: str) -> float:
    """NaN, Infinity, -Infinity (what Python's json module writes): read as those
    floats, so a JSONL record follows the one rule of Parquet and Dataset rows:
    a non-finite number in a carried field is stored as null and named in the
    item's `nonfinite_fields` (store._sidecar_row); anywhere else it is the
    field's usual type error."""
    return float(name)


_DECODER = json.JSONDecoder(parse_float=_json_number, parse_constant=_json_constant)   # built once


def _loads(text: str):
    """json.loads, refusing numbers that overflow a float (NaN / Infinity are read: `_json_constant`);
    nesting too deep for the parser is a ValueError, not a RecursionError."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise _TooDeep("record is nested too deeply: objects / arrays inside each other deeper than the "
                       f"JSON parser takes (about {sys.getrecursionlimit()} levels); flatten it") from None


class _TooDeep(ValueError):
    """JSON nested beyond the parser's recursion limit."""


def _utf8_reason(line: str) -> str:
    """Where the first undecodable byte of a line (read with surrogateescape) is."""
    m = _ESCAPED_BYTE.search(line)
    at = len(line[:m.start()].encode("utf-8", "surrogateescape"))
    return (f"line is not valid UTF-8: byte 0x{ord(m.group()) - 0xdc00:02x} at byte {at} of the line; "
            "convert the file to UTF-8 (e.g. iconv -f WINDOWS-1252 -t UTF-8)")


def _iter_raw(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line, parsed value, parse error) for each record of one file;
    `.jsonl.gz` / `.json.gz` are decompressed on the fly."""
    kind = _kind(path)
    if kind == "parquet":
        yield from _iter_parquet(path)
        return
    if kind == "json":
        yield from _iter_json(path)
        return
    lineno = 0
    try:
        with _open_bytes(path) as raw:
            head = raw.read(SNIFF_BYTES)
        # \n ends a line (\r\n too: the \r is JSON whitespace), and so does a lone \r in a
        # file of old Mac line endings (no \n at all in its first 64 KiB; elsewhere a raw \r
        # is whitespace between JSON tokens, as before); undecodable bytes are kept, to name them
        cr_only = b"\r" in head and b"\n" not in head
        with _open_bytes(path) as raw:
            f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                 newline=None if cr_only else "\n")
            for lineno, line in enumerate(f, 1):
                if not line.strip(_BLANK):
                    continue  # blank lines are not records
                if line.startswith("\ufeff"):
                    line = line[1:]   # a byte order mark where files were concatenated
                if _ESCAPED_BYTE.search(line):
                    yield lineno, line, _utf8_reason(line)
                    continue
                try:
                    yield lineno, _loads(line), None
                except ValueError as e:  # the raw text, to salvage the id
                    yield lineno, line, str(e) if isinstance(e, _TooDeep) else f"invalid JSON: {e}"
    except (OSError, EOFError, zlib.error) as e:
        if not _is_gz(path):
            raise
        raise InputFileError(f"input file {str(path)!r}: the gzip data is damaged or truncated after line "
                             f"{lineno} ({e}); re-create the file "
                             "(gzip -t tests it)") from None


def _iter_json(path: Path) -> Iterator[tuple[int, object, str | None]]:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        if not _is_gz(path):
            raise
        raise InputFileError(f"input file {str(path)!r}: the gzip data is damaged or truncated ({e}); "
                             "re-create the file (gzip -t tests it)") from None
    try:
        value = _loads(data.decode("utf-8-sig"))  # a BOM is not an error
    except UnicodeDecodeError as e:
        yield 1, None, (f"file is not valid UTF-8: byte 0x{e.object[e.start]:02x} at byte {e.start}; "
                        "convert it to UTF-8")
        return
    except _TooDeep as e:
        yield 1, None, str(e).replace("record is", "the file is", 1)
        return
    except ValueError as e:
        hint = ("; it looks like JSON Lines (one object per line): name it .jsonl"
                if "Extra data" in str(e) and data.lstrip(_BLANK.encode() + b"\xef\xbb\xbf").startswith(b"{")
                else "")
        yield 1, None, f"file is not valid JSON: {e}{hint}"
        return
    if not isinstance(value, list):
        yield 1, None, f"a .json input must be an array of records, got {type(value).__name__}"
        return
    for i, v in enumerate(value):
        yield i + 1, v, None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install 'rjepa_latent[parquet]'  (pyarrow)") from None
    return pyarrow


def _open_parquet(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"input file {str(path)!r} is not a readable Parquet file: {e}; check that it "
                             "was written completely (or re-export it); nothing was written") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Rows in file order (row groups in order), line = row index + 1; the
    values are Arrow's `to_pylist` (struct -> dict, list -> list)."""
    pa = _pyarrow()
    pf = _open_parquet(path)
    line = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                line += 1
                yield line, row, None
    except pa.ArrowException as e:   # damage inside the file: no row count to go on with
        raise ValueError(f"input file {str(path)!r}: cannot read Parquet after row {line}: {e}") from None


def is_dataset(obj: object) -> bool:
    """Whether `obj` is an HF datasets.Dataset (TypeError for the other datasets
    containers, which have no one record order or no length)."""
    datasets = sys.modules.get("datasets")   # not imported: it cannot be one
    if datasets is None or isinstance(obj, (str, os.PathLike, list, tuple)):
        return False
    if isinstance(obj, datasets.Dataset):
        return True
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"a {type(obj).__name__} holds several splits: pick one (ds['test'])")
    if isinstance(obj, datasets.IterableDataset):
        raise TypeError("an IterableDataset has no length or fingerprint; materialize it "
                        "(datasets.Dataset.from_generator or .from_list)")
    return False


def _iter_dataset(ds) -> Iterator[tuple[int, object, str | None]]:
    """Rows of a datasets.Dataset in its order (selections and shuffles
    included), as Arrow rows -> Python values (whatever `with_format` it has)."""
    line = 0
    for table in ds.with_format("arrow").iter(batch_size=1024):
        for row in table.to_pylist():
            line += 1
            yield line, row, None


def dataset_fingerprint(ds) -> dict:
    """The identity of a datasets.Dataset: its row count and the sha256 of its
    rows as read (JSON of each row's values, in order), so the same rows give
    the same fingerprint whatever the cache, the chunking or the datasets version."""
    h = hashlib.sha256()
    n = 0
    for _, row, _ in _iter_dataset(ds):
        h.update(json.dumps(row, ensure_ascii=False, default=repr).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
        n += 1
    return {"name": DATASET_SOURCE, "rows": n, "sha256": h.hexdigest()}


def input_sources(inputs: Any) -> list[tuple[str, Callable[[], Iterator]]]:
    """(source name, row iterator factory) of each input: files (checked to exist
    and sniffed, `sniff_input`; a Parquet file's footer checked) or one datasets.Dataset."""
    if is_dataset(inputs):
        return [(DATASET_SOURCE, lambda: _iter_dataset(inputs))]
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist or is not a file")
        sniff_input(p)   # binary, not UTF-8, not JSON: refused now, naming the file
    return [(p.name, (lambda p=p: _iter_raw(p))) for p in paths]


_ID_IN_BROKEN = re.compile(r'"(?:id|cot_id)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def _salvage_id(raw: object) -> str | None:
    """Best effort: the id of a record whose JSON is broken, for its error line."""
    m = _ID_IN_BROKEN.search(raw) if isinstance(raw, str) else None
    if not m:
        return None
    try:
        rid = str(json.loads(m.group(1)))
        rid.encode("utf-8")  # a lone surrogate escape could not be written to errors.jsonl
        return rid
    except (ValueError, UnicodeEncodeError):
        return None


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_unicode(obj: object) -> None:
    """JSON may escape lone UTF-16 surrogates (\\ud800); such strings are not
    Unicode text: the tokenizer and the UTF-8 output files cannot take them."""
    try:  # default=repr: Parquet / Dataset rows may hold dates, decimals, bytes
        json.dumps(obj, ensure_ascii=False, default=repr).encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadRecord(f"record contains a lone UTF-16 surrogate (\\u{ord(e.object[e.start]):04x} escape), "
                         "which is not valid Unicode text") from None


def _record_id(obj: dict) -> str | None:
    for key in ID_FIELDS:
        if key in obj and obj[key] is not None:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise _BadRecord(f"'{key}' must be a string or an integer, got {type(v).__name__}")
            v = str(v)
            if not v:
                raise _BadRecord(f"'{key}' is empty")
            return v
    return None


def _question(obj: dict) -> str | None:
    for key in QUESTION_FIELDS:
        if key in obj and obj[key] is not None:
            if not isinstance(obj[key], str):
                raise _BadRecord(f"'{key}' must be a string, got {type(obj[key]).__name__}")
            return obj[key]
    return None


def _detect_format(obj: dict) -> str:
    """A null field counts as absent: a Parquet / Dataset row has every column,
    with nulls where the record has no such field."""
    def has(key: str) -> bool:
        return obj.get(key) is not None
    if has("steps"):
        return "cot"
    if has("answer") and has("question"):
        return "gsm8k"
    if has("text"):
        return "text"
    if has("messages"):
        return "messages"
    present = sorted(k for k, v in obj.items() if v is not None)
    raise _BadRecord(f"cannot tell the format from the fields {present[:8]}: expected 'steps' (cot), "
                     "'question'+'answer' (gsm8k), 'text' (text) or 'messages' (messages); or pass --format")


def _check_steps(steps: list[str]) -> None:
    if not steps:
        raise _BadRecord("empty step list")
    for i, s in enumerate(steps, 1):
        if not isinstance(s, str):
            raise _BadRecord(f"step {i} is not a string ({type(s).__name__})")
        if s == "":
            raise _BadRecord(f"step {i} is an empty string")
        if not s.strip():   # it would get no token of its own, or only whitespace ones
            raise _BadRecord(f"step {i} is only whitespace")


@dataclass(frozen=True)
class _Options:
    template: Template
    segmenter: Segmenter
    strip: bool
    chat: Chat | None

    def render(self, question: str | None, steps: list[str], answer: str | None = None):
        if self.chat is None:
            return self.template.render(question, steps)
        body, ranges = _joined(steps, self.template.step_separator)
        return self.chat._render(question, body, ranges, answer)


def _answer(obj: dict, opts: _Options) -> str | None:
    """A cot record's final `answer` (the assistant's content with --chat-think)."""
    if opts.chat is None or not opts.chat.think or obj.get("answer") is None:
        return None
    if not isinstance(obj["answer"], str):
        raise _BadRecord(f"'answer' must be a string, got {type(obj['answer']).__name__}")
    return obj["answer"]


def _cot(obj: dict, opts: _Options) -> tuple[str, list[tuple[int, int]]]:
    if "steps" not in obj:
        raise _BadRecord("missing 'steps' (a list of strings)")
    steps = obj["steps"]
    if not isinstance(steps, list):
        raise _BadRecord(f"'steps' must be a list of strings, got {type(steps).__name__}")
    _check_steps(steps)
    if opts.strip:
        steps = [remove_annotations(s)[0] for s in steps]
        for i, s in enumerate(steps, 1):
            if not s:
                raise _BadRecord(f"step {i} is nothing but calculator annotations (--strip-annotations)")
    return opts.render(_question(obj), steps, _answer(obj, opts))


def _gsm8k(obj: dict, opts: _Options) -> tuple[str, list[tuple[int, int]]]:
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str):
            raise _BadRecord(f"gsm8k record needs a string '{key}'")
    answer = remove_annotations(obj["answer"])[0] if opts.strip else obj["answer"]
    if opts.segmenter.rule == "ranges":
        raise _BadRecord("--segment ranges needs a text record with 'step_ranges'; this is a gsm8k record")
    if opts.segmenter.rule == "auto":
        steps = [ln for ln in _LINE_BREAK.split(answer) if ln.strip()]
        if not steps:
            raise _BadRecord("empty step list ('answer' has no non-blank line)")
    else:
        steps = [answer[a:b] for a, b in opts.segmenter.split(answer)]
    return opts.render(obj["question"], steps)


def _text(obj: dict, opts: _Options) -> tuple[str, list[tuple[int, int]]]:
    text = obj.get("text")
    if not isinstance(text, str):
        raise _BadRecord("missing 'text' (a string)")
    if not text.strip():
        raise _BadRecord("'text' is empty")
    if obj.get("step_ranges") is not None:
        ranges = _given_ranges(obj, text)
        if opts.strip:
            text, where = remove_annotations(text)
            ranges = [(where(a), where(b)) for a, b in ranges]
            for k, (a, b) in enumerate(ranges):
                if a == b:
                    raise _BadRecord(f"step_ranges[{k}] is nothing but calculator annotations "
                                     "(--strip-annotations)")
    else:
        if opts.segmenter.rule == "ranges":
            raise _BadRecord("missing 'step_ranges' (--segment ranges): [[start, end], ...] character "
                             "ranges of the steps in 'text'")
        if opts.strip:
            text = remove_annotations(text)[0]
        if opts.segmenter.rule == "auto":
            ranges = _marker_ranges(text, opts.segmenter._marker)
        else:
            ranges = opts.segmenter.split(text)
        if not ranges:
            raise _BadRecord("'text' is empty")
    if opts.chat is None:
        return text, ranges
    return opts.chat._render(_question(obj), text, ranges, _answer(obj, opts))


def _messages(obj: dict, opts: _Options) -> tuple[str, list[tuple[int, int]]]:
    if opts.chat is None:
        raise _BadRecord("a 'messages' record is rendered through the model's chat template: "
                         "pass --chat (chat=True)")
    if "messages" not in obj:
        raise _BadRecord("missing 'messages' (a list of {role, content} objects)")
    try:
        msgs, idx, field_, ranges = steps_of_messages(obj["messages"])
    except ChatTemplateError as e:
        raise _BadRecord(str(e)) from None
    if opts.segmenter.rule == "ranges":
        raise _BadRecord("--segment ranges needs a text record with 'step_ranges'; this is a messages record")
    if opts.segmenter.rule != "auto":
        ranges = opts.segmenter.split(msgs[idx][field_])
    if opts.chat.system:
        if msgs[0]["role"] == "system":
            raise _BadRecord("the record has its own system message and --system was given; drop one")
        msgs.insert(0, {"role": "system", "content": opts.chat.system})
        idx += 1
    return opts.chat.render_steps(msgs, idx, field_, ranges)


_BUILDERS = {"cot": _cot, "gsm8k": _gsm8k, "text": _text, "messages": _messages}


def _metadata(obj: dict, fmt: str) -> dict:
    """Carried scalar fields; a reserved name gets `record_` in front, again while
    that is another field's name (`text` beside `record_text` -> `record_record_text`)."""
    meta = {}
    for k, v in obj.items():
        if k in _CONSUMED[fmt] or not (v is None or isinstance(v, (str, int, float, bool))):
            continue
        name = k
        if k in RESERVED_META:
            name = f"record_{k}"
            while name in obj or name in RESERVED_META:
                name = f"record_{name}"
        meta[name] = v
    return meta


def _parse_record(obj: object, fmt: str, opts: _Options):
    """-> (id or None, text, step ranges, metadata); raises _BadRecord."""
    if not isinstance(obj, dict):
        hint = ""
        if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
            hint = (f" of {len(obj)} objects (a JSON array of records? a .jsonl line is one record; "
                    "name an array file .json)")
        raise _BadRecord(f"a record must be a JSON object, got {type(obj).__name__}{hint}")
    rid = _record_id(obj)
    f = _detect_format(obj) if fmt == "auto" else fmt
    text, ranges = _BUILDERS[f](obj, opts)
    return rid, text, ranges, _metadata(obj, f)


class IdIndex:
    """The ids seen so far, for duplicate detection without holding every id as a
    Python str: a private temporary SQLite database on disk (deleted on close;
    its page cache is bounded), keyed by the exact id, so nothing but an equal id
    is ever a duplicate. `add` returns None for a new id, else where the first
    occurrence was."""

    BATCH = 4096   # ids per transaction (a commit per id would be slow)

    def __init__(self):
        import sqlite3
        # "": a private temporary on-disk database, removed on close; used by one thread at a time
        self._db = sqlite3.connect("", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA cache_size=-4096")   # KiB: bounded memory at millions of ids
        self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, loc TEXT) WITHOUT ROWID")
        self._pending = 0

    def add(self, rid: str, where: str) -> str | None:
        cur = self._db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?)", (rid, where))
        if cur.rowcount == 1:
            self._pending += 1
            if self._pending >= self.BATCH:
                self._db.commit()
                self._pending = 0
            return None
        return self._db.execute("SELECT loc FROM ids WHERE id = ?", (rid,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __del__(self) -> None:
        try:
            self._db.close()
        except Exception:
            pass


def read_records(inputs: Any, fmt: str = "auto", template: Template | None = None,
                 step_regex: str = DEFAULT_STEP_REGEX, *, segment: str | Segmenter = "auto",
                 strip_annotations: bool = False, chat: Chat | None = None) -> Iterator[Record | ErrorRecord]:
    """Yield every record of `inputs` in order: a `Record` or an `ErrorRecord`.

    `inputs`: paths of .jsonl / .json / .parquet files, or a datasets.Dataset.
    `segment`: a `Segmenter` rule for free texts; `strip_annotations`: remove GSM8K
    calculator annotations; `chat`: render through a chat template.
    Duplicate ids (across all files) make every occurrence after the first an
    error. A missing file raises FileNotFoundError (that is not a bad record).
    """
    return _read(input_sources(inputs), fmt, template, step_regex, segment, strip_annotations, chat)


def read_rows(rows: Iterable[dict], fmt: str = "auto", template: Template | None = None,
              step_regex: str = DEFAULT_STEP_REGEX, *, segment: str | Segmenter = "auto",
              strip_annotations: bool = False, chat: Chat | None = None,
              source: str = "rows") -> Iterator[Record | ErrorRecord]:
    """`read_records` over records already in memory (one dict per record, plain
    Python values, e.g. a batch of a Ray Data pipeline): the same formats,
    segmentation, id and error rules, one result per row in order; `line` is the
    row's 1-based position and `source` names them in errors."""
    rows = list(rows)
    return _read([(source, lambda: ((i + 1, r, None) for i, r in enumerate(rows)))],
                 fmt, template, step_regex, segment, strip_annotations, chat)


def _read(sources: list, fmt: str, template: Template | None, step_regex: str,
          segment: str | Segmenter, strip_annotations: bool, chat: Chat | None) -> Iterator[Record | ErrorRecord]:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "messages" and chat is None:
        raise ValueError("format 'messages' is rendered through the model's chat template: pass --chat (chat=True)")
    segmenter = segment if isinstance(segment, Segmenter) else Segmenter(segment, step_regex)
    opts = _Options(template or Template(), segmenter, bool(strip_annotations), chat)
    return _records(sources, fmt, opts)


def _records(sources: list, fmt: str, opts: _Options) -> Iterator[Record | ErrorRecord]:
    seen = IdIndex()
    index = 0
    for name, rows in sources:
        stem = source_stem(name)
        for line, obj, parse_error in rows():
            rid = None
            try:
                if parse_error:
                    rid = _salvage_id(obj)
                    raise _BadRecord(parse_error)
                rid = _record_id(obj) if isinstance(obj, dict) else None
                _check_unicode(obj)
                rid, text, ranges, meta = _parse_record(obj, fmt, opts)
                rid = rid if rid is not None else f"{stem}:{line}"
                first = seen.add(rid, f"{name}:{line}")
                if first is not None:
                    raise _BadRecord(f"duplicate id {rid!r} (first seen at {first})")
                yield Record(index, rid, text, ranges, meta, name, line)
            except (_BadRecord, RecursionError) as e:
                if rid is not None and not _utf8_ok(rid):
                    rid = None  # errors.jsonl is UTF-8
                reason = str(e) if isinstance(e, _BadRecord) else \
                    "record is nested too deeply to process (objects / arrays inside each other); flatten it"
                yield ErrorRecord(index, rid, name, line, reason)
            index += 1

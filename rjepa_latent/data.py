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
  regex); `auto` picks per record from its fields.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

FORMATS = ("auto", "cot", "gsm8k", "text")
DEFAULT_TEMPLATE = "{question}\n{steps}"
DEFAULT_STEP_SEPARATOR = "\n"
DEFAULT_STEP_REGEX = r"Step\s+\d+:"

ID_FIELDS = ("id", "cot_id")
QUESTION_FIELDS = ("question", "statement", "problem")
# fields consumed to build the text; everything else scalar is carried as metadata
_CONSUMED = {"cot": set(ID_FIELDS) | set(QUESTION_FIELDS) | {"steps"},
             "gsm8k": set(ID_FIELDS) | {"question", "answer"},
             "text": set(ID_FIELDS) | {"text"}}
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


# ---------------------------------------------------------------- reading files

def _iter_raw(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line, parsed value, parse error) for each record of one file."""
    if path.suffix.lower() == ".json":
        try:
            with open(path, "r", encoding="utf-8-sig") as f:  # a BOM is not an error
                value = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            yield 1, None, f"file is not valid JSON: {e}"
            return
        if not isinstance(value, list):
            yield 1, None, f"a .json input must be an array of records, got {type(value).__name__}"
            return
        for i, v in enumerate(value):
            yield i + 1, v, None
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are not records
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"line is not valid UTF-8: {e}"
                continue
            try:
                yield lineno, json.loads(text), None
            except ValueError as e:
                yield lineno, text, f"invalid JSON: {e}"  # the raw text, to salvage the id


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
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
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
    if "steps" in obj:
        return "cot"
    if "answer" in obj and "question" in obj:
        return "gsm8k"
    if "text" in obj:
        return "text"
    raise _BadRecord(f"cannot tell the format from the fields {sorted(obj)[:8]}: expected 'steps' (cot), "
                     "'question'+'answer' (gsm8k) or 'text' (text); or pass --format")


def _check_steps(steps: list[str]) -> None:
    if not steps:
        raise _BadRecord("empty step list")
    for i, s in enumerate(steps, 1):
        if not isinstance(s, str):
            raise _BadRecord(f"step {i} is not a string ({type(s).__name__})")
        if s == "":
            raise _BadRecord(f"step {i} is an empty string")


def _cot(obj: dict, template: Template) -> tuple[str, list[tuple[int, int]]]:
    if "steps" not in obj:
        raise _BadRecord("missing 'steps' (a list of strings)")
    steps = obj["steps"]
    if not isinstance(steps, list):
        raise _BadRecord(f"'steps' must be a list of strings, got {type(steps).__name__}")
    _check_steps(steps)
    return template.render(_question(obj), steps)


_LINE_BREAK = re.compile(r"\r\n|\n|\r")


def _gsm8k(obj: dict, template: Template) -> tuple[str, list[tuple[int, int]]]:
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str):
            raise _BadRecord(f"gsm8k record needs a string '{key}'")
    steps = [ln for ln in _LINE_BREAK.split(obj["answer"]) if ln.strip()]
    if not steps:
        raise _BadRecord("empty step list ('answer' has no non-blank line)")
    return template.render(obj["question"], steps)


def _text(obj: dict, marker: re.Pattern) -> tuple[str, list[tuple[int, int]]]:
    text = obj.get("text")
    if not isinstance(text, str):
        raise _BadRecord("missing 'text' (a string)")
    if not text.strip():
        raise _BadRecord("'text' is empty")
    starts = [m.start() for m in marker.finditer(text)]
    if not starts:
        begin = len(text) - len(text.lstrip())
        return text, [(begin, len(text.rstrip()))]
    ends = starts[1:] + [len(text)]
    # trailing whitespace (the newline before the next marker) belongs to no step
    return text, [(s, s + len(text[s:e].rstrip())) for s, e in zip(starts, ends)]


def _metadata(obj: dict, fmt: str) -> dict:
    meta = {}
    for k, v in obj.items():
        if k in _CONSUMED[fmt] or not (v is None or isinstance(v, (str, int, float, bool))):
            continue
        meta[f"record_{k}" if k in RESERVED_META else k] = v
    return meta


def _parse_record(obj: object, fmt: str, template: Template, marker: re.Pattern):
    """-> (id or None, text, step ranges, metadata); raises _BadRecord."""
    if not isinstance(obj, dict):
        raise _BadRecord(f"a record must be a JSON object, got {type(obj).__name__}")
    rid = _record_id(obj)
    f = _detect_format(obj) if fmt == "auto" else fmt
    if f == "cot":
        text, ranges = _cot(obj, template)
    elif f == "gsm8k":
        text, ranges = _gsm8k(obj, template)
    else:
        text, ranges = _text(obj, marker)
    return rid, text, ranges, _metadata(obj, f)


def read_records(paths: Iterable[str | Path], fmt: str = "auto", template: Template | None = None,
                 step_regex: str = DEFAULT_STEP_REGEX) -> Iterator[Record | ErrorRecord]:
    """Yield every record of `paths` in order: a `Record` or an `ErrorRecord`.

    Duplicate ids (across all files) make every occurrence after the first an
    error. A missing file raises FileNotFoundError (that is not a bad record).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    template = template or Template()
    try:
        marker = re.compile(step_regex)
    except re.error as e:
        raise ValueError(f"step_regex {step_regex!r} is not a valid regular expression: {e}") from None
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist or is not a file")
    seen: dict[str, str] = {}
    index = 0
    for path in paths:
        for line, obj, parse_error in _iter_raw(path):
            rid = None
            try:
                if parse_error:
                    rid = _salvage_id(obj)
                    raise _BadRecord(parse_error)
                rid = _record_id(obj) if isinstance(obj, dict) else None
                _check_unicode(obj)
                rid, text, ranges, meta = _parse_record(obj, fmt, template, marker)
                rid = rid if rid is not None else f"{path.stem}:{line}"
                if rid in seen:
                    raise _BadRecord(f"duplicate id {rid!r} (first seen at {seen[rid]})")
                seen[rid] = f"{path.name}:{line}"
                yield Record(index, rid, text, ranges, meta, path.name, line)
            except _BadRecord as e:
                if rid is not None and not _utf8_ok(rid):
                    rid = None  # errors.jsonl is UTF-8
                yield ErrorRecord(index, rid, path.name, line, str(e))
            index += 1

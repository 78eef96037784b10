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

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .chat import ChatTemplate, ChatTemplateError, load_chat_template, steps_of_messages
from .select import ChatText, chat_content_ranges
from .segment import (DEFAULT_STEP_REGEX, Segmenter, _BadRecord, _LINE_BREAK, _given_ranges, _marker_ranges,
                      remove_annotations)
from .sources import input_sources, source_stem


FORMATS = ("auto", "cot", "gsm8k", "text", "messages")
DEFAULT_TEMPLATE = "{question}\n{steps}"
DEFAULT_STEP_SEPARATOR = "\n"

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
    content: list | None = None   # a chat text's message ranges (the rest is template scaffolding)


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
            text, found = self.template.render_steps(msgs, idx, field_, ranges)
            return ChatText(text, chat_content_ranges(self.template, msgs, text)), found
        except ChatTemplateError as e:
            raise _BadRecord(str(e)) from None
        except Exception as e:   # the template is foreign code: whatever it raises is this record's error
            raise _BadRecord(f"{self.template.where}: the chat template failed on this record: "
                             f"{type(e).__name__}: {e}") from None


def _joined(steps: list[str], separator: str) -> tuple[str, list[tuple[int, int]]]:
    return Template("{steps}", separator).render(None, steps)


# ---------------------------------------------------------------- records


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
                yield Record(index, rid, str(text), ranges, meta, name, line, getattr(text, "content", None))
            except (_BadRecord, RecursionError) as e:
                if rid is not None and not _utf8_ok(rid):
                    rid = None  # errors.jsonl is UTF-8
                reason = str(e) if isinstance(e, _BadRecord) else \
                    "record is nested too deeply to process (objects / arrays inside each other); flatten it"
                yield ErrorRecord(index, rid, name, line, reason)
            index += 1

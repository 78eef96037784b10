"""Chat templates: a record rendered through the model's own template, with
the exact character range of every reasoning step in the rendered text.

- `load_chat_template(path)` finds the template of a checkpoint: an HF
  directory's `chat_template.jinja`, `chat_template.json` or
  `tokenizer_config.json` (`chat_template`, a string or a list of named
  templates, "default" first), or a GGUF file's `tokenizer.chat_template`;
  with the special tokens (`bos_token`, `eos_token`, ...) the template may use.
- `ChatTemplate.render(messages)` gives exactly what transformers'
  `apply_chat_template(messages, tokenize=False)` gives: Jinja2's sandboxed
  environment with the same settings (`trim_blocks`, `lstrip_blocks`, loop
  controls, the `{% generation %}` block), the same globals and filters
  (`raise_exception`, `strftime_now`, `namespace`, `dict`, a `tojson` that
  does not escape HTML), the special tokens in the context, and a message's
  reasoning visible as `reasoning_content` and `thinking`.
- `ChatTemplate.render_steps(...)` renders once as is and once with an
  invisible marker (private-use characters) around each step; when removing
  the markers gives the same text, their positions are the steps' exact
  ranges. A template that changes the marked text (trimming a step's edge,
  say) falls back to finding the steps (or their trimmed text) in order in
  the plain render; a step that cannot be found (a template that drops the
  reasoning, say) is an error, never a guess.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

from ..errors import ModelFormatError


_OPEN, _CLOSE = "\ue000", "\ue001"   # private-use characters: never in real text
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A record cannot be rendered through the chat template (or there is none)."""


# ------------------------------------------------------------------ loading

def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):   # an AddedToken as JSON
        return v["content"]
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFormatError(f"{path}: cannot read: {e}") from None


def _pick_template(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):   # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        if isinstance(chosen, str):
            return chosen
    raise ModelFormatError(f"{where}: chat_template must be a string or a list of named templates")


def load_chat_template(path: str | os.PathLike) -> "ChatTemplate":
    """The chat template of a checkpoint (HF directory or .gguf file);
    ChatTemplateError when the model has none."""
    path = os.fspath(path)
    special: dict[str, str] = {}
    source = None
    if path.lower().endswith(".gguf"):
        from ..checkpoints.gguf_loader import _Metadata, _open_reader
        meta = _Metadata(_open_reader(path), path)
        source = meta.get("tokenizer.chat_template")
        tokens = meta.get("tokenizer.ggml.tokens") or []
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"),
                          ("sep_token", "seperator_token_id")):
            tid = meta.get("tokenizer.ggml." + key)
            if isinstance(tid, int) and 0 <= tid < len(tokens):
                special[name] = tokens[tid]
    else:
        cfg_file = os.path.join(path, "tokenizer_config.json")
        cfg = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"{cfg_file}: not a JSON object")
        stm_file = os.path.join(path, "special_tokens_map.json")
        stm = _read_json(stm_file) if os.path.isfile(stm_file) else {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(cfg.get(name)) or (_token_text(stm.get(name)) if isinstance(stm, dict) else None)
            if text is not None:
                special[name] = text
        jinja_file = os.path.join(path, "chat_template.jinja")
        json_file = os.path.join(path, "chat_template.json")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                source = f.read()
        elif os.path.isfile(json_file):
            data = _read_json(json_file)
            source = _pick_template(data.get("chat_template") if isinstance(data, dict) else None,
                                    json_file)
        else:
            source = _pick_template(cfg.get("chat_template"), cfg_file)
    if not source:
        raise ChatTemplateError(f"{path}: the model has no chat template (looked for chat_template.jinja, "
                                "chat_template.json, tokenizer_config.json's chat_template, or GGUF "
                                "tokenizer.chat_template); run without --chat, or use a model that has one")
    return ChatTemplate(source, special, where=path)


# ------------------------------------------------------------------ the environment

def _environment():
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers
        uses it to mark assistant tokens; the text is unchanged)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """namespace() without underscore attributes (no route to interpreter internals)."""
        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")

    class DictFactory:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace, dict=DictFactory(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env, jinja2


# ------------------------------------------------------------------ rendering

def _with_reasoning_aliases(messages: Sequence[dict]) -> list[dict]:
    """Each message's reasoning under every name templates read it by."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object with 'role' and 'content'")
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        m = dict(m)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict | None = None, where: str = "chat template"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.where = where
        env, jinja2 = _environment()
        self._errors = (jinja2.exceptions.TemplateError,)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ModelFormatError(f"{where}: the chat template does not compile: {e}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The text transformers' apply_chat_template(messages, tokenize=False) gives."""
        try:
            return self._template.render(messages=_with_reasoning_aliases(messages), tools=None,
                                         documents=None, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except self._errors as e:
            raise ChatTemplateError(f"{self.where}: the chat template refused the messages: {e}") from None

    def render_steps(self, messages: Sequence[dict], message: int, field: str,
                     ranges: Sequence[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """Render `messages`; return the text and the exact range, in it, of each
        of `ranges` (character ranges within `messages[message][field]`)."""
        plain = self.render(messages)
        value = messages[message][field]
        marked_value, pos = [], 0
        for a, b in ranges:
            marked_value += [value[pos:a], _OPEN, value[a:b], _CLOSE]
            pos = b
        marked_value.append(value[pos:])
        marked = [dict(m) for m in messages]
        marked[message][field] = "".join(marked_value)
        found = _strip_markers(self.render(marked), len(ranges))
        if found is not None and found[0] == plain:
            return plain, found[1]
        steps = [value[a:b] for a, b in ranges]
        try:
            return plain, self._find_in_order(plain, steps)
        except ChatTemplateError:
            if field in REASONING_FIELDS and not any(x.strip() and x.strip() in plain for x in steps):
                raise ChatTemplateError(
                    f"{self.where}: the chat template drops the assistant's reasoning ({field}): "
                    "its steps are not in the rendered text. --chat-think needs a template that shows "
                    "the reasoning (e.g. Qwen3's <think> block); use --chat to give the steps as "
                    "the assistant's answer instead") from None
            raise

    def _find_in_order(self, text: str, steps: list[str]) -> list[tuple[int, int]]:
        out, pos = [], 0
        for k, s in enumerate(steps):
            at = text.find(s, pos)
            if at < 0 and s.strip() != s:   # the template trimmed the step's edge
                s = s.strip()
                at = text.find(s, pos) if s else -1
            if at < 0:
                raise ChatTemplateError(f"{self.where}: step {k + 1} ({s[:40]!r}) is not in the "
                                        "rendered text (the template changes it)")
            out.append((at, at + len(s)))
            pos = at + len(s)
        return out


def _strip_markers(text: str, n: int) -> tuple[str, list[tuple[int, int]]] | None:
    """(text without markers, [(start, end)] of each marked part) when the
    render holds exactly n well-nested marker pairs, else None."""
    out, ranges, start, pos = [], [], None, 0
    for i, ch in enumerate(text):
        if ch == _OPEN:
            if start is not None:
                return None
            out.append(text[pos:i])
            start, pos = sum(map(len, out)), i + 1
        elif ch == _CLOSE:
            if start is None:
                return None
            out.append(text[pos:i])
            ranges.append((start, sum(map(len, out))))
            start, pos = None, i + 1
    out.append(text[pos:])
    if start is not None or len(ranges) != n:
        return None
    return "".join(out), ranges


# ------------------------------------------------------------------ records -> messages

def step_messages(question: str | None, steps: Sequence[str], *, separator: str = "\n",
                  think: bool = False, answer: str | None = None,
                  system: str | None = None) -> tuple[list[dict], int, str, list[tuple[int, int]]]:
    """The conversation of a question and its steps: [system?, user: question,
    assistant: steps joined by `separator`] — with `think`, the steps are the
    assistant's reasoning (`reasoning_content`) and `answer` its content.
    Returns (messages, index of the assistant message, the field holding the
    steps, each step's range within that field)."""
    joined, ranges, pos = [], [], 0
    for k, s in enumerate(steps):
        if k:
            joined.append(separator)
            pos += len(separator)
        joined.append(s)
        ranges.append((pos, pos + len(s)))
        pos += len(s)
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": question or ""})
    body = "".join(joined)
    if think:
        msgs.append({"role": "assistant", "reasoning_content": body, "content": answer or ""})
        field = "reasoning_content"
    else:
        msgs.append({"role": "assistant", "content": body})
        field = "content"
    return msgs, len(msgs) - 1, field, ranges


def steps_of_messages(messages: Any) -> tuple[list[dict], int, str, list[tuple[int, int]]]:
    """Where the steps of an OpenAI-format `messages` record are: the last
    assistant message's reasoning (`reasoning_content`, `thinking` or
    `reasoning`) if it has one, else its `content`; each non-blank line of it
    is one step (its range without the line break)."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        for key in ("content",) + REASONING_FIELDS:
            if key in m and m[key] is not None and not isinstance(m[key], str):
                raise ChatTemplateError(f"messages[{i}].{key} must be a string")
    idx = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)
    if idx is None:
        raise ChatTemplateError("'messages' has no assistant message (the steps are its lines)")
    m = messages[idx]
    field = next((k for k in REASONING_FIELDS if m.get(k)), "content")
    text = m.get(field) or ""
    ranges, pos = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped:
            a = pos + line.index(stripped)
            ranges.append((a, a + len(stripped)))
        pos += len(line) + 1
    if not ranges:
        raise ChatTemplateError(f"messages[{idx}] (the last assistant message) has no non-blank "
                                f"line in its {field}: no step")
    return [dict(x) for x in messages], idx, field, ranges

"""Records -> token ids + step token spans, with the model's own tokenizer.

Design choices:
- The model's `tokenizers.Tokenizer` is used with its own special-token rules
  (`add_special_tokens=True`, e.g. a BOS token), on a private copy with
  truncation and padding switched off: a text is never silently cut.
- Span rule (docs/design.md): a token belongs to the FIRST step whose character
  range its offset range overlaps; tokens with an empty offset range (special
  tokens) belong to no step. A step's span is [first, last + 1) of its tokens.
  A step with no token is an error for that record.
- A text with more tokens than `max_text_tokens` (the pipeline's
  `max_tokens` option: the longest text) is an error for that record, never
  truncated.
- Bounded work before that refusal (`max_token_chars`): where the
  tokenizer's structure proves that every character of the text lies in
  exactly one token and no token covers more than `L` characters, a text of
  more than `max_text_tokens * L` characters must have more than
  `max_text_tokens` tokens, and is refused from its length alone, in O(1)
  time and memory, before it is tokenized. Proven for byte-level BPE
  (no normalizer; pre-tokenizers ByteLevel and Split that removes nothing;
  no fused unknown tokens; no added token that strips the whitespace beside
  it): each byte becomes one character of exactly one
  token, so a token covers at most as many characters of the text as its
  vocabulary string has characters (`L` = the longest vocabulary entry or
  added token, counted in bytes). A UTF-8 byte count alone bounds nothing
  in general (normalizers change lengths, pre-tokenizers drop whitespace),
  so other tokenizers get no early refusal: their texts are tokenized and
  counted as before.
- `encode_steps` is the same path for one question and its steps (or a
  text and its step character ranges): `data.Template` builds the text,
  `tokenize_records` applies this rule, so a newcomer's spans are exactly
  the pipeline's.
- `encode_batch` runs in Rust without the GIL, so tokenizing the next shard
  overlaps with the engine's compute in another thread.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .data import DEFAULT_STEP_SEPARATOR, DEFAULT_TEMPLATE, ErrorRecord, Record, Template


@dataclass
class Item:
    """A record ready for the engine."""
    index: int
    id: str
    text: str
    ids: np.ndarray      # int32 [T]
    spans: np.ndarray    # int32 [n_steps, 2], [start, end) token positions
    meta: dict
    source: str
    line: int
    offsets: np.ndarray | None = None     # int64 [T, 2]: each token's character range
    content: list | None = None           # a chat text's message ranges (Record.content)


def prepare_tokenizer(tokenizer):
    """A copy of `tokenizer` with truncation and padding off (never mutate the model's)."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (no tokenizer.json next to the checkpoint); "
                         "extraction from text needs one")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's JSON serialization (vocabulary, merges, rules)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


# pre-tokenizers that keep every character of the text (Split keeps them
# unless its behavior is "Removed"); ByteLevel must be one of them
_KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Split")
_max_token_chars_cache: dict[int, tuple[Any, int | None]] = {}


def _keeps_every_character(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(parts, list) or not parts:
        return False
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in _KEEPING_PRE_TOKENIZERS:
            return False
        if part["type"] == "Split" and str(part.get("behavior", "")).lower() == "removed":
            return False
    return any(part["type"] == "ByteLevel" for part in parts)


def max_token_chars(tokenizer) -> int | None:
    """The most characters of a text one token can cover, where the
    tokenizer's structure proves such a bound (byte-level BPE, see the module
    docstring), else None. Cached per tokenizer object: for the private
    copies of `prepare_tokenizer`, which nothing changes afterwards."""
    hit = _max_token_chars_cache.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    try:
        spec = json.loads(tokenizer.to_str())
    except (AttributeError, ValueError):
        return None
    model = spec.get("model") or {}
    bound = None
    if (spec.get("normalizer") is None and _keeps_every_character(spec.get("pre_tokenizer"))
            and model.get("type") == "BPE" and not (model.get("unk_token") and model.get("fuse_unk"))
            and isinstance(model.get("vocab"), dict) and model["vocab"]):
        # byte-level vocabulary strings spell one byte per character
        bound = max(len(k) for k in model["vocab"])
        for added in spec.get("added_tokens") or []:
            if added.get("lstrip") or added.get("rstrip"):
                bound = None  # such a token also absorbs any run of whitespace beside it
                break
            bound = max(bound, len(str(added.get("content", "")).encode("utf-8")))
    if len(_max_token_chars_cache) >= 8:
        _max_token_chars_cache.clear()
    _max_token_chars_cache[id(tokenizer)] = (tokenizer, bound)
    return bound


def step_spans(offsets: np.ndarray, steps: list[tuple[int, int]]) -> tuple[np.ndarray, int | None]:
    """Token spans of each step from token char offsets [T, 2].

    Returns (spans int32 [n_steps, 2], None) or (partial, k) where step k
    (0-based) has no token.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    free = ends > starts  # special tokens (empty range) belong to no step
    spans = np.zeros((len(steps), 2), dtype=np.int32)
    for k, (a, b) in enumerate(steps):
        mine = free & (starts < b) & (ends > a)
        where = np.flatnonzero(mine)
        if where.size == 0:
            return spans, k
        spans[k] = (where[0], where[-1] + 1)
        free &= ~mine
    return spans, None


def tokenize_records(tokenizer, records: list[Record],
                     max_text_tokens: int | None) -> list[Item | ErrorRecord]:
    """Tokenize good records (one batched call); bad ones become ErrorRecords.
    The result is in the order of `records`."""
    if not records:
        return []
    per_token = max_token_chars(tokenizer) if max_text_tokens is not None else None
    limit = max_text_tokens * per_token if per_token is not None else None
    out: list[Item | ErrorRecord | None] = [None] * len(records)
    todo = []
    for i, rec in enumerate(records):
        if limit is not None and len(rec.text) > limit:  # refused from its length, untokenized
            out[i] = ErrorRecord(rec.index, rec.id, rec.source, rec.line,
                                 f"text has {len(rec.text)} characters, so more than --max-tokens "
                                 f"{max_text_tokens} tokens (the model's context by default; a token "
                                 f"of this tokenizer covers at most {per_token} characters); "
                                 "shorten or split the record")
        else:
            todo.append(i)
    encodings = tokenizer.encode_batch([records[i].text for i in todo]) if todo else []
    for i, enc in zip(todo, encodings):
        out[i] = _item(records[i], enc, max_text_tokens)
    return out


def _item(rec: Record, enc, max_text_tokens: int | None) -> Item | ErrorRecord:
    n = len(enc.ids)
    if max_text_tokens is not None and n > max_text_tokens:
        return ErrorRecord(rec.index, rec.id, rec.source, rec.line,
                           f"text has {n} tokens, more than --max-tokens {max_text_tokens} "
                           "(the model's context by default); shorten or split the record")
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(n, 2)
    spans, missing = step_spans(offsets, rec.steps)
    if missing is not None:
        a, b = rec.steps[missing]
        return ErrorRecord(rec.index, rec.id, rec.source, rec.line,
                           f"step {missing + 1} has no token of its own (characters {a}:{b}, "
                           f"{rec.text[a:b][:40]!r}): the tokenizer merged it into a token of "
                           "an earlier step or the question")
    return Item(rec.index, rec.id, rec.text, np.asarray(enc.ids, dtype=np.int32), spans,
                rec.meta, rec.source, rec.line, offsets, rec.content)


_prepared_cache: dict[str, Any] = {}


def _prepared(tokenizer):
    """The private copy (prepare_tokenizer) of a caller's tokenizer, cached by
    the tokenizer's full serialization, so a tokenizer changed since the last
    call gets a new copy (and a new bound)."""
    spec = tokenizer.to_str()
    key = hashlib.sha256(spec.encode("utf-8")).hexdigest()
    tok = _prepared_cache.get(key)
    if tok is None:
        tok = prepare_tokenizer(tokenizer)
        if len(_prepared_cache) >= 8:
            _prepared_cache.clear()
        _prepared_cache[key] = tok
    return tok


def encode_steps(model_or_tokenizer, question: str | None = None, steps: Sequence[str] | None = None,
                 *, text: str | None = None, step_ranges: Sequence[tuple[int, int]] | None = None,
                 template: str = DEFAULT_TEMPLATE, separator: str = DEFAULT_STEP_SEPARATOR,
                 max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Token ids and step token spans of one chain of thought, exactly as
    `extract_dataset` makes them (data.Template, then the span rule).

    Either `question` (or None) and `steps` (non-empty strings), joined by
    `template` (with `{question}` and `{steps}`) and `separator`; or `text`
    with `step_ranges`, the [start, end) character range of each step.
    `model_or_tokenizer` is an `rjepa_latent.Model` or a
    `tokenizers.Tokenizer`. `max_tokens` is the longest text allowed (default:
    a Model's context, else no limit). Returns (ids int32 [T], spans int32
    [n_steps, 2], text); raises ValueError naming the step or the length when
    the record cannot be used (a step without a token of its own, too long).
    """
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None:
        raise ValueError(f"the model {getattr(model_or_tokenizer, 'path', '')} has no tokenizer (no "
                         "tokenizer.json next to the checkpoint, or none in the GGUF file); pass a "
                         "tokenizers.Tokenizer instead")
    if not hasattr(tokenizer, "encode_batch"):
        raise TypeError("encode_steps takes an rjepa_latent.Model or a tokenizers.Tokenizer, got "
                        f"{type(model_or_tokenizer).__name__}")
    if max_tokens is None and tokenizer is not model_or_tokenizer:
        max_tokens = (getattr(model_or_tokenizer, "config", None) or {}).get("max_position_embeddings")
    if text is not None or step_ranges is not None:
        if steps is not None or question is not None:
            raise ValueError("give either question and steps, or text and step_ranges, not both")
        if not isinstance(text, str) or step_ranges is None:
            raise ValueError("text must be a string and step_ranges its steps' [start, end) "
                             "character ranges")
        ranges = [(int(a), int(b)) for a, b in step_ranges]
        if not ranges:
            raise ValueError("step_ranges is empty: give each step's [start, end) character range")
        for k, (a, b) in enumerate(ranges, 1):
            if not 0 <= a < b <= len(text):
                raise ValueError(f"step {k}: character range [{a}, {b}) is empty or outside the "
                                 f"text of {len(text)} characters")
    else:
        if isinstance(steps, str) or not steps:
            raise ValueError("steps must be a non-empty list of strings (one per reasoning step)")
        for k, step in enumerate(steps, 1):
            if not isinstance(step, str) or not step:
                raise ValueError(f"step {k} must be a non-empty string, got {step!r}")
        if question is not None and not isinstance(question, str):
            raise ValueError(f"question must be a string or None, got {type(question).__name__}")
        text, ranges = Template(template, separator).render(question, list(steps))
    rec = Record(0, "encode_steps", text, ranges, {}, "<encode_steps>", 1)
    (result,) = tokenize_records(_prepared(tokenizer), [rec], max_tokens)
    if isinstance(result, ErrorRecord):
        raise ValueError(result.reason)
    return result.ids, result.spans, text

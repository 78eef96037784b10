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
- `encode_batch` runs in Rust without the GIL, so tokenizing the next shard
  overlaps with the engine's compute in another thread.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .data import ErrorRecord, Record


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
    """Tokenize good records (one batched call); bad ones become ErrorRecords."""
    if not records:
        return []
    encodings = tokenizer.encode_batch([r.text for r in records])
    out: list[Item | ErrorRecord] = []
    for rec, enc in zip(records, encodings):
        n = len(enc.ids)
        if max_text_tokens is not None and n > max_text_tokens:
            out.append(ErrorRecord(rec.index, rec.id, rec.source, rec.line,
                                   f"text has {n} tokens, more than --max-tokens {max_text_tokens} "
                                   "(the model's context by default); shorten or split the record"))
            continue
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(n, 2)
        spans, missing = step_spans(offsets, rec.steps)
        if missing is not None:
            a, b = rec.steps[missing]
            out.append(ErrorRecord(rec.index, rec.id, rec.source, rec.line,
                                   f"step {missing + 1} has no token of its own (characters {a}:{b}, "
                                   f"{rec.text[a:b][:40]!r}): the tokenizer merged it into a token of "
                                   "an earlier step or the question"))
            continue
        out.append(Item(rec.index, rec.id, rec.text, np.asarray(enc.ids, dtype=np.int32), spans,
                        rec.meta, rec.source, rec.line))
    return out

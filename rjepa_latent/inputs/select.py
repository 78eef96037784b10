"""Which tokens of a text a run keeps (`tokens=`, `drop_bos=`), and each row's
norm and outlier mark (`outliers=`).

- `all`: every token. `no-special`: without the tokenizer's special tokens
  (its added tokens marked special: BOS, EOS, `<|im_start|>`, ...), chat
  scaffolding kept. `text`: without special tokens and, for a text rendered
  through a chat template, without the template's scaffolding (every
  character outside the messages' own strings: role names, headers, the line
  breaks the template adds). `steps`: only tokens inside a step (the span
  rule's tokens, `token_steps >= 0`).
- `drop_bos`: also drop position 0 when it is a special token: the BOS the
  tokenizer or the chat template puts first (a template without a BOS, such
  as ChatML, opens with `<|im_start|>`): the sequence's attention sink.
- `chat_content_ranges` finds the messages' strings in a rendered chat text
  the way the step ranges are found: one more render with invisible markers
  around each string.
- Norms and outlier marks of the stored rows: store/token_rows.py.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_MODES = ("all", "text", "steps", "no-special")


class ChatText(str):
    """A text rendered through a chat template, with `content`: the [start, end)
    ranges of the messages' own strings in it (the rest is scaffolding)."""

    def __new__(cls, text: str, content: list[tuple[int, int]]):
        obj = super().__new__(cls, text)
        obj.content = content
        return obj


def check_selection(tokens: str, drop_bos: bool, outliers, drop_outliers: bool) -> None:
    """ValueError naming the option that is wrong."""
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    if not isinstance(drop_bos, bool):
        raise TypeError(f"drop_bos must be a bool, got {type(drop_bos).__name__}")
    if outliers is not None:
        if isinstance(outliers, bool) or not isinstance(outliers, (int, float)) \
                or not np.isfinite(outliers) or outliers <= 0:
            raise ValueError(f"outliers must be a positive finite number (K x the median norm), "
                             f"got {outliers!r}")
    if drop_outliers and outliers is None:
        raise ValueError("drop_outliers needs outliers=K (--outliers K): which rows are outliers")


def special_token_ids(tokenizer) -> np.ndarray:
    """Sorted int32 ids of a `tokenizers.Tokenizer`'s special added tokens."""
    ids = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    return np.asarray(sorted(ids), dtype=np.int32)


def selected_positions(ids: np.ndarray, spans: np.ndarray, mode: str, *, special_ids: np.ndarray,
                       drop_bos: bool, offsets: np.ndarray | None = None,
                       content: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """int32 positions (ascending) of the tokens `mode` keeps in one sequence.
    `offsets` [T, 2] (character ranges) and `content` (a chat text's message
    ranges; None: the whole text is content) are needed by mode "text"."""
    t = len(ids)
    keep = np.ones(t, dtype=bool)
    if mode in ("text", "no-special"):
        keep &= ~np.isin(ids, special_ids)
    if mode == "text" and content is not None:
        if offsets is None:
            raise ValueError("tokens='text' on a chat text needs the tokens' character offsets")
        inside = np.zeros(t, dtype=bool)
        for a, b in content:   # a token overlapping a message's string is text
            inside |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        keep &= inside
    if mode == "steps":
        inside = np.zeros(t, dtype=bool)
        for a, b in np.asarray(spans).reshape(-1, 2):
            inside[a:b] = True
        keep &= inside
    if drop_bos and t and np.isin(ids[0], special_ids):
        keep[0] = False
    return np.flatnonzero(keep).astype(np.int32)


def trimmed_spans(spans: np.ndarray, keep: np.ndarray, num_tokens: int) -> tuple[np.ndarray, str | None]:
    """The step spans for pooling under a selection: each span trimmed to its
    selected tokens. (spans, None), or (None, reason) when a span keeps no
    token or has an unselected token between selected ones (a pooled span is
    a contiguous run of tokens)."""
    mask = np.zeros(num_tokens, dtype=bool)
    mask[keep] = True
    out = np.array(spans, dtype=np.int32, copy=True).reshape(-1, 2)
    for k, (a, b) in enumerate(out):
        where = np.flatnonzero(mask[a:b])
        if where.size == 0:
            return None, f"step {k + 1} keeps no token under the token selection"
        if where.size != where[-1] - where[0] + 1:
            gap = int(a + where[0] + np.flatnonzero(~mask[a + where[0]:a + where[-1]])[0])
            return None, (f"step {k + 1} holds a token the selection drops (position {gap}) between "
                          "tokens it keeps; a pooled span is contiguous: use tokens='all'")
        out[k] = (a + where[0], a + where[-1] + 1)
    return out, None


def chat_content_ranges(template, messages: Sequence[dict], plain: str) -> list[tuple[int, int]]:
    """[start, end) of every string of `messages` (content and reasoning) in
    `plain`, their rendered text: found by a render with markers around each;
    a template that changes the marked text falls back to finding each string
    (or its stripped text) in order; a string not found is scaffolding."""
    from .chat import REASONING_FIELDS, _CLOSE, _OPEN, _strip_markers
    fields = [(i, f) for i, m in enumerate(messages) for f in ("content",) + REASONING_FIELDS
              if isinstance(m.get(f), str) and m[f]]
    marked = [dict(m) for m in messages]
    for i, f in fields:
        marked[i][f] = _OPEN + marked[i][f] + _CLOSE
    try:
        found = _strip_markers(template.render(marked), len(fields))
    except Exception:   # the template is foreign code; fall back to finding the strings
        found = None
    if found is not None and found[0] == plain:
        return [r for r in found[1] if r[1] > r[0]]
    out, pos = [], 0
    for i, f in fields:
        s = messages[i][f]
        at = plain.find(s, pos)
        if at < 0:
            s = s.strip()
            at = plain.find(s, pos) if s else -1
        if at >= 0:
            out.append((at, at + len(s)))
            pos = at + len(s)
    return out

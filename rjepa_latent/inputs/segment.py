"""Segmenters: where the steps of a text are (lines, paragraphs, sentences, a
marker regex, given ranges), and GSM8K calculator annotations removed with an
offset map back to the original text."""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


SEGMENT_RULES = ("auto", "lines", "paragraphs", "sentences", "regex:PATTERN", "ranges")
_NAMED_RULES = ("auto", "lines", "paragraphs", "sentences", "ranges")
DEFAULT_STEP_REGEX = r"Step\s+\d+:"


class _BadRecord(Exception):
    """Internal: raised while converting one record, caught into an ErrorRecord."""


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

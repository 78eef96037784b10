"""The one packer: which sequences run together in one engine call.

Design choices:
- One cost rule (`batch_cost`): a batch costs max(its tokens, its spans).
  Tokens are rows of the engine's workspace; spans are pooled in chunks of
  that many rows, so they need not fit it, but counting them also bounds a
  batch's result (one row per span and layer) by the same budget, which keeps
  per-call host memory predictable when spans overlap or outnumber tokens.
  Everything that packs (`Model.extract`, the pipeline) packs here with this
  rule.
- Greedy: items are taken in order and a batch is closed only when the next
  item would take it over `max_batch_tokens`. An item that alone costs more
  than the budget gets a batch of its own; whether such a batch may run is
  the caller's decision (`Model.check`: grown for the call on the CPU,
  refused on CUDA).
- The order is the input order (`Model.extract`) or longest first, ties by
  input position (`longest_first=True`, the pipeline): sorting makes batches
  of similar lengths, which the packed forward likes.
- The pipeline's packing window is one shard (the store's unit of work and of
  resume), so a resumed run recomputes exactly the batches an uninterrupted
  run would, and never needs items of a shard that is already stored.
- A plan is a pure function of the costs and the budget: no clock, no
  randomness, no dependence on which shards are already done.
"""
from __future__ import annotations

from typing import Sequence


def batch_cost(tokens: int, spans: int) -> int:
    """The budget an engine call over `tokens` tokens and `spans` spans uses (see module docstring)."""
    return max(int(tokens), int(spans))


def plan_batches(tokens: Sequence[int], max_batch_tokens: int, spans: Sequence[int] | None = None,
                 longest_first: bool = True) -> list[list[int]]:
    """Batches as lists of positions into `tokens` (token count of each item;
    `spans`: span count of each item, default none), each of cost at most
    `max_batch_tokens` unless it is one item that costs more alone."""
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) \
            or max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    if spans is not None and len(spans) != len(tokens):
        raise ValueError(f"spans has {len(spans)} counts but tokens has {len(tokens)}")
    n_spans = spans if spans is not None else [0] * len(tokens)
    order = range(len(tokens))
    if longest_first:
        order = sorted(order, key=lambda i: (-batch_cost(tokens[i], n_spans[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    tok = nsp = 0
    for i in order:
        if current and batch_cost(tok + tokens[i], nsp + n_spans[i]) > max_batch_tokens:
            batches.append(current)
            current, tok, nsp = [], 0, 0
        current.append(i)
        tok += tokens[i]
        nsp += n_spans[i]
    if current:
        batches.append(current)
    return batches


def shard_ranges(num_records: int, shard_size: int) -> list[tuple[int, int]]:
    """Shard k covers input records [k * shard_size, (k + 1) * shard_size)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(s, min(s + shard_size, num_records)) for s in range(0, num_records, shard_size)]


def part_shards(num_shards: int, part: tuple[int, int]) -> list[int]:
    """Shards of worker `part` = (i, n): every n-th shard starting at i."""
    i, n = part
    if n <= 0 or not 0 <= i < n:
        raise ValueError(f"part must be i/n with 0 <= i < n, got {i}/{n}")
    return list(range(i, num_shards, n))

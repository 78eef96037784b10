"""Deterministic packing of tokenized items into batches under a token budget.

Design choices:
- The packing window is one shard (the store's unit of work and of resume):
  the items of a shard are sorted by length (longest first, ties by input
  position) and packed greedily in that order into batches of at most
  `max_batch_tokens` tokens. Sorting makes batches of similar lengths, which
  is what the engine's packed forward likes; a window per shard means a
  resumed run recomputes exactly the batches an uninterrupted run would, and
  never needs items of a shard that is already stored.
- The plan is a pure function of the lengths and the budget: no clock, no
  randomness, no dependence on which shards are already done.
- An item longer than the budget gets a batch of its own (the engine is told
  a budget large enough for it).
"""
from __future__ import annotations

from typing import Sequence


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Return batches as lists of positions into `lengths`."""
    if max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if current and used + n > max_batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
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

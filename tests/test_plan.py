"""Deterministic packing: every item exactly once, budget respected, sorted
within the window, independent of anything but lengths and budget."""
import random

import pytest

from rjepa_latent.engine.plan import part_shards, plan_batches, shard_ranges


def test_plan_covers_respects_budget_and_sorts():
    rng = random.Random(3)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    batches = plan_batches(lengths, 1024)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in batches)
    seq = [lengths[i] for i in flat]
    assert seq == sorted(seq, reverse=True)  # longest first
    # greedy: a batch is closed only when the next item does not fit
    for b, nxt in zip(batches, batches[1:]):
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > 1024
    assert plan_batches(list(lengths), 1024) == batches  # deterministic


def test_plan_ties_by_position_and_oversize_alone():
    assert plan_batches([5, 5, 5], 10) == [[0, 1], [2]]
    assert plan_batches([3, 50, 4], 10) == [[1], [2, 0]]  # over budget: a batch of its own
    assert plan_batches([], 10) == []
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], 0)


def test_shards_and_parts():
    assert shard_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert shard_ranges(0, 3) == []
    assert part_shards(7, (1, 3)) == [1, 4]
    assert sorted(sum((part_shards(10, (i, 4)) for i in range(4)), [])) == list(range(10))
    for bad in [(3, 3), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="part"):
            part_shards(5, bad)
    with pytest.raises(ValueError, match="shard_size"):
        shard_ranges(5, 0)

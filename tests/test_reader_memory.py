"""Reader memory does not grow with the run: each reader operation (open,
lookup by id, iteration, info, verify, every export) in a fresh process, its
peak RSS at 40,000 records within a bound of the same at 2,000 (the growth of
the reader that kept every record's metadata was about 1.1 KiB per record:
40 MiB here)."""
from __future__ import annotations

import pytest

from scale_runs import OPERATIONS, reader_peak_mib, write_scale_run

SMALL, LARGE = 2_000, 40_000
BOUND_MIB = 8.0   # the id index and line offsets take 12 + 8 bytes a record at most: < 1 MiB here


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {n: write_scale_run(root / f"run{n}", n, shard_size=500) for n in (SMALL, LARGE)}


# to_hf_dataset is left out: `datasets` reads the whole Arrow stream file it maps
# (its pages count in RSS), so its figure grows with the run (tests/bench_scale.py shows it)
@pytest.mark.parametrize("what", [w for w in OPERATIONS if w != "hf"])
def test_reader_memory_is_flat_in_the_number_of_records(runs, what):
    small = reader_peak_mib(runs[SMALL], what, SMALL)
    large = reader_peak_mib(runs[LARGE], what, LARGE)
    assert large - small < BOUND_MIB, f"{what}: {small:.1f} MiB at {SMALL} records, {large:.1f} at {LARGE}"

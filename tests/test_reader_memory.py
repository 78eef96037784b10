"""Reader memory does not grow with the run: each reader operation (open,
lookup by id, iteration, info, verify, every export) in a fresh process, its
peak RSS at 40,000 records within a bound of the same at 2,000 (the growth of
the reader that kept every record's metadata was about 1.1 KiB per record:
40 MiB here)."""
from __future__ import annotations

import pytest

from scale_runs import OPERATIONS, reader_peak_mib, write_scale_run

SMALL, LARGE = 2_000, 40_000
# the id index and line offsets take 12 + 8 bytes a record at most (< 1 MiB here);
# the rest is what a few shards and one HF record batch hold, reached by 40,000
BOUND_MIB = 20.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {n: write_scale_run(root / f"run{n}", n, shard_size=500) for n in (SMALL, LARGE)}


@pytest.mark.parametrize("what", OPERATIONS)
def test_reader_memory_is_flat_in_the_number_of_records(runs, what, tmp_path, monkeypatch):
    if what == "hf":
        pytest.importorskip("datasets")
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))   # a fresh Arrow file each time
    small = reader_peak_mib(runs[SMALL], what, SMALL)
    large = reader_peak_mib(runs[LARGE], what, LARGE)
    assert large - small < BOUND_MIB, f"{what}: {small:.1f} MiB at {SMALL} records, {large:.1f} at {LARGE}"

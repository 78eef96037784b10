"""rjepa_latent.ray on real Ray clusters: a local one with fractional CPUs
(`ray.init(num_cpus=2)`, actors at 0.5 CPU) and a simulated two-node one
(`ray.cluster_utils.Cluster`), one of them alive at a time and each started
once per module (tests run in file order: the local ones first). Every run
is compared with the single-process `rjepa-latent extract` byte for byte, and
StepLatents with what `open_latents` reads for the same records.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rjepa-latent[ray]')")

import rjepa_latent as rl  # noqa: E402
from rjepa_latent import ray as rlray  # noqa: E402

ROOT = Path(rl.__file__).resolve().parents[1]
GSM8K = ROOT.parents[1] / "shared" / "data" / "gsm8k" / "test.jsonl"
N_RECORDS, SHARD = 40, 4
LAYERS = "1,-1"


def _records() -> list[dict]:
    """GSM8K-like records with ids (Ray Data keeps no order), and two bad ones."""
    rows = []
    if GSM8K.is_file():
        with open(GSM8K, encoding="utf-8") as f:
            for i, line in zip(range(N_RECORDS), f):
                rows.append({"id": f"g{i}", **json.loads(line)})
    else:   # the same shape, made up
        for i in range(N_RECORDS):
            rows.append({"id": f"g{i}", "question": f"Tom has {i} apples and buys {i + 3} more. How many?",
                         "answer": f"He buys {i + 3}.\nHe has {i} + {i + 3} = {2 * i + 3}.\n#### {2 * i + 3}"})
    rows[7] = {"id": "bad-empty", "question": "q", "steps": []}          # an empty step list
    rows[23] = {"id": "bad-steps", "question": "q", "steps": "not a list"}
    return rows


def _descendants(name: str) -> list:
    import psutil
    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and name in p.name()]


class Clusters:
    """One Ray cluster at a time for this module: `local()` or `two_nodes()`."""

    def __init__(self):
        self.kind, self.cluster, self.address = None, None, None

    def _stop(self):
        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.kind, self.cluster, self.address = None, None, None

    def local(self) -> str:
        if self.kind != "local":
            self._stop()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            self.kind, self.address = "local", ray.get_runtime_context().gcs_address
        return self.address

    def two_nodes(self):
        if self.kind != "two_nodes":
            from ray.cluster_utils import Cluster
            self._stop()
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "include_dashboard": False})
            self.cluster.add_node(num_cpus=1)
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, log_to_driver=False)
            self.kind, self.address = "two_nodes", self.cluster.address
        return self.cluster


@pytest.fixture(scope="module")
def clusters():
    c = Clusters()
    yield c
    c._stop()
    deadline = time.time() + 20
    while _descendants("raylet") and time.time() < deadline:
        time.sleep(0.2)
    assert not _descendants("raylet"), "a raylet outlived ray.shutdown() / cluster.shutdown()"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """(model dir, data file, the single-process CLI's run directory, the CLI command)."""
    root = tmp_path_factory.mktemp("ray")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    model = tiny_model_dir("llama")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cmd(out: Path, *extra: str) -> list:
        return [sys.executable, "-m", "rjepa_latent.cli", "extract", str(data), "--model", str(model),
                "--out", str(out), "--shard-size", str(SHARD), f"--layers={LAYERS}", "--no-progress",
                *extra]
    ref = root / "reference"
    r = subprocess.run(cmd(ref, "--device", "cpu", "--threads", "1"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return model, data, ref, cmd, env, root


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}   # hidden temporaries included


# ------------------------------------------------------------ StepLatents (local cluster)

def _step_latents_rows(ds, model, batch_format: str | None) -> dict:
    kw = {} if batch_format is None else {"batch_format": batch_format}
    out = ds.map_batches(rlray.StepLatents, fn_constructor_kwargs={"model": str(model), "layers": [1, -1]},
                         compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5, batch_size=6, **kw)
    tables = [ray.get(ref) for ref in out.to_arrow_refs()]
    import pyarrow as pa
    table = pa.concat_tables([t for t in tables if t.num_rows])
    return {row["id"]: (i, row) for i, row in enumerate(table.to_pylist())}, table


@pytest.mark.parametrize("batch_format", [None, "pyarrow"])
def test_step_latents_equal_the_stored_latents(clusters, setup, batch_format):
    model, data, ref, *_ = setup
    clusters.local()
    rows = _records()
    got, table = _step_latents_rows(ray.data.from_items(rows), model, batch_format)
    assert set(got) == {r["id"] for r in rows}
    store = rl.open_latents(ref)
    hidden = store.config["hidden_size"]
    assert table.schema.field("latents_L1").type == \
        __import__("pyarrow").list_(__import__("pyarrow").list_(__import__("pyarrow").float32(), hidden))
    for item in store:
        _, row = got[item.id]
        assert row["error"] is None
        assert row["num_steps"] == len(item.token_spans) and row["num_tokens"] == item.meta["num_tokens"]
        assert np.array_equal(np.asarray(row["token_spans"], np.int32), item.token_spans)
        for j, col in enumerate(("latents_L1", "latents_L3")):
            np.testing.assert_array_equal(np.asarray(row[col], np.float32), item.latents[j])
    errors = {e["id"]: e["reason"] for e in store.errors}
    assert set(errors) == {"bad-empty", "bad-steps"}
    for rid, reason in errors.items():   # the CLI's reason, and nothing else in the row
        _, row = got[rid]
        assert row["error"] == reason
        assert row["latents_L1"] is None and row["token_spans"] is None and row["num_steps"] is None

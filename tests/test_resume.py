"""Kill -9 at random instants of `rjepa-latent extract` over GSM8K records,
resume with the same command, and compare every file's bytes with an
uninterrupted run.

Two kinds of kills: (1) RJEPA_TEST_KILL_AT=k makes the process SIGKILL itself
at its k-th write step (mid-write of a temporary file, after its fsync,
after the rename, after the directory fsync), so kills land on many distinct
instants of the atomic-write protocol; several kills are chained before the
final resume. (2) SIGKILL from outside after a random delay.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rjepa_latent as rl

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
N_RECORDS, SHARD = 200, 10
SEED = int(os.environ.get("RJEPA_RESUME_SEED", "20261125"))

pytestmark = pytest.mark.slow


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # hidden temporaries included


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    data = root / "gsm8k_head.jsonl"
    if GSM8K.is_file():
        with open(GSM8K, "rb") as f:
            data.write_bytes(b"".join(next(f) for _ in range(N_RECORDS)))
    else:   # records of the same shape, so the kill tests run wherever the data is absent
        data.write_text("".join(json.dumps({
            "question": f"Janet has {i} ducks and buys {i % 7} more. How many ducks?",
            "answer": f"She has {i} ducks.\nShe buys {i % 7} more.\n{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7}"})
            + "\n" for i in range(N_RECORDS)))
    model = tiny_model_dir("llama")

    def cmd(out: Path) -> list:
        return [sys.executable, "-m", "rjepa_latent.cli", "extract", str(data), "--model", str(model),
                "--out", str(out), "--shard-size", str(SHARD), "--layers=1", "--device", "cpu",
                "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(rl.__file__).parents[1])}
    env.pop("RJEPA_TEST_KILL_AT", None)
    ref = root / "reference"
    t = time.perf_counter()
    subprocess.run(cmd(ref), env=env, check=True, capture_output=True)
    return cmd, env, snapshot(ref), time.perf_counter() - t, root


def test_reference_is_complete(setup):
    cmd, env, ref, _, root = setup
    store = rl.open_latents(root / "reference")
    assert store.complete and len(store) + len(store.errors) == N_RECORDS


@pytest.mark.parametrize("chain", range(3))
def test_kill_at_write_steps_then_resume(setup, chain):
    cmd, env, ref, _, root = setup
    rng = random.Random(SEED + chain)
    out = root / f"kill_steps_{chain}"
    n_shards = -(-N_RECORDS // SHARD)
    # (start manifest, 3 files per shard: safetensors, jsonl, journal entry; errors.jsonl and the
    # final manifest) x 4 write steps each
    total_steps = 4 * (3 + 3 * n_shards)
    kills = [rng.randint(1, total_steps), rng.randint(1, 24), rng.randint(total_steps - 12, total_steps)]
    died = 0
    for k in kills:
        r = subprocess.run(cmd(out), env={**env, "RJEPA_TEST_KILL_AT": str(k)}, capture_output=True)
        assert r.returncode in (0, -signal.SIGKILL), r.stderr.decode()[-2000:]
        died += r.returncode == -signal.SIGKILL
    assert died >= 1, kills
    if any(p.name.startswith("manifest") for p in out.iterdir()):
        partial = rl.open_latents(out)  # a killed run is readable: finished shards only
        assert len(partial) <= len(rl.open_latents(root / "reference"))
    r = subprocess.run(cmd(out), env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert snapshot(out) == ref, kills


@pytest.mark.parametrize("trial", range(2))
def test_kill_at_random_time_then_resume(setup, trial):
    cmd, env, ref, full_s, root = setup
    rng = random.Random(SEED * 7 + trial)
    out = root / f"kill_time_{trial}"
    p = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.3, 0.9) * full_s)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(cmd(out), env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert snapshot(out) == ref
    r = subprocess.run(cmd(out), env=env, capture_output=True, text=True)  # finished: a no-op
    assert r.returncode == 0 and "nothing to do" in r.stdout and snapshot(out) == ref

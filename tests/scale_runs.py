"""Large finished run directories written fast (no model, no tokenizer), and
the reader memory probe that tests/bench_scale.py and tests/test_reader_memory.py
share: each reader operation in a fresh process, its peak RSS above the
process's RSS after imports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = {"model_fingerprint": "scale", "model_type": "fake", "num_layers": 2, "layers": [1],
          "hidden_size": 8, "dtype": "float32", "pooling": "mean"}
OPERATIONS = ("open", "by_id", "iterate", "info", "verify", "parquet", "npy", "hf")


def write_scale_run(out: Path, records: int, shard_size: int = 1000, hidden: int = 8) -> Path:
    """A finished run of `records` items (ids r0, r1, ...; two steps each,
    a short text and one carried field) through the store's own writer."""
    from rjepa_latent.store.write import RunStore
    config = {**CONFIG, "hidden_size": hidden, "shard_size": shard_size}
    store = RunStore(out, config)
    spans = np.array([[1, 3], [3, 6]], np.int32)
    ids = np.arange(6, dtype=np.int32)
    try:
        store.prepare(records)
        for k, start in enumerate(range(0, records, shard_size)):
            n = min(shard_size, records - start)
            items = [SimpleNamespace(id=f"r{start + i}", ids=ids, spans=spans, source="scale.jsonl",
                                     text=f"what is {(start + i) % 97} plus 3? add. the sum.",
                                     line=start + i + 1, meta={"difficulty": (start + i) % 7})
                     for i in range(n)]
            lat = np.random.default_rng(k).standard_normal((n, 1, 2, hidden), dtype=np.float32)
            store.write_shard(k, (start, start + n), items, list(lat), [])
        if not store.finish(records):
            raise RuntimeError(f"{out}: the run did not finish")
    finally:
        store.close()
    return out


CHILD = r"""
import json, random, sys, tempfile
from pathlib import Path
import numpy as np, pyarrow, pyarrow.parquet
import rjepa_latent as rl
from rjepa_latent.store import export, info, files
run, what, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024   # kB -> MiB

if what == "hf":
    import datasets
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # reset the peak RSS to now
base = status("VmRSS")
tmp = Path(tempfile.mkdtemp(prefix="rjepa-mem-"))
if what == "open":
    s = rl.open_latents(run); assert len(s) == n
elif what == "by_id":
    s = rl.open_latents(run)
    for i in random.Random(0).sample(range(n), min(n, 2000)):
        assert s[f"r{i}"].latents.shape == (1, 2, s.config["hidden_size"])
elif what == "iterate":
    total = sum(float(it.latents[0, 0, 0]) for it in rl.open_latents(run))
elif what == "info":
    assert info.inspect_run(run)["records_done"] == n
elif what == "verify":
    assert files.verify_run(run) == {}
elif what == "parquet":
    assert export.export_parquet(rl.open_latents(run), tmp / "x.parquet", layer=1)["rows"] == n
elif what == "npy":
    export.export_npy(rl.open_latents(run), tmp / "npy")
elif what == "hf":
    ds = rl.open_latents(run).to_hf_dataset(layer=1); assert len(ds) == n
print(json.dumps({"peak_mib": status("VmHWM") - base}))
"""


def reader_peak_mib(run: Path, what: str, records: int, timeout: float = 3600) -> float:
    """Peak RSS (MiB) of one reader operation over `run`, above the RSS of its
    fresh process after imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", CHILD, str(run), what, str(records)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} over {run} failed:\n{r.stderr[-3000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"])

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

ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]' in the clone)")

import rjepa_latent as rl  # noqa: E402
from rjepa_latent import ray as rlray  # noqa: E402
from rjepa_latent.run import ray as rl_ray  # noqa: E402

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

    def cmd(out: Path, *extra: str) -> list:
        return [sys.executable, "-m", "rjepa_latent.cli", "extract", str(data), "--model", str(model),
                "--out", str(out), "--shard-size", str(SHARD), f"--layers={LAYERS}", "--no-progress",
                *extra]
    ref = root / "reference"
    r = subprocess.run(cmd(ref, "--device", "cpu", "--threads", "1"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return model, data, ref, cmd, _env, root


def _env() -> dict:
    """A subprocess's environment, taken now: ray.init sets what joining the
    cluster needs (RAY_AUTH_MODE) in this process's environment."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


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


def test_step_latents_ids_without_an_id_column(tiny_model_dir):
    """No cluster: GSM8K-shaped rows (no id) get a stable id from their content,
    the same in any batch and in either batch format, and are extracted;
    `id_column=` names the id; an empty id_column is an error row."""
    import pyarrow as pa
    from rjepa_latent.integrations.ray_data import content_id
    rows = [{"question": "Tom has 3.", "answer": "3 + 4 = 7.\n#### 7"},
            {"question": "Ann has 2.", "answer": "2 + 2 = 4.\n#### 4"}]
    sl = rlray.StepLatents(str(tiny_model_dir("llama")), layers=[-1], threads=1)
    both = sl(pa.Table.from_pylist(rows))
    assert both.column("error").to_pylist() == [None, None]
    ids = both.column("id").to_pylist()
    assert ids == [content_id(r) for r in rows] and ids[0] != ids[1] and ids[0].startswith("sha256:")
    assert sl(pa.Table.from_pylist(rows[1:])).column("id").to_pylist() == ids[1:]
    as_numpy = sl({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert as_numpy.column("id").to_pylist() == ids
    np.testing.assert_array_equal(np.asarray(as_numpy.column("latents")[0].as_py(), np.float32),
                                  np.asarray(both.column("latents")[0].as_py(), np.float32))
    named = rlray.StepLatents(str(tiny_model_dir("llama")), layers=[-1], threads=1, id_column="qid")
    t = named(pa.Table.from_pylist([{**rows[0], "qid": 17}, {**rows[1], "qid": None}]))
    assert t.column("id").to_pylist() == ["17", None]
    assert t.column("error").to_pylist()[0] is None and "id column 'qid' is empty" in t.column("error")[1].as_py()
    with pytest.raises(ValueError, match="id_column"):
        rlray.StepLatents(str(tiny_model_dir("llama")), id_column="")


def test_step_latents_takes_a_path_and_one_span_pooling(model_of, tiny_model_dir):
    with pytest.raises(TypeError, match="checkpoint path, not a Model"):
        rlray.StepLatents(model_of("llama"))
    for pooling in ("none", ["mean", "max"]):
        with pytest.raises(ValueError, match="one span pooling"):
            rlray.StepLatents(str(tiny_model_dir("llama")), pooling=pooling)


def test_step_latents_batches_of_bad_rows_and_of_no_rows(tiny_model_dir):
    """No cluster: every row bad, an empty batch in both formats; the schema is
    the same as for good rows (Ray Data concatenates the blocks) and HF datasets
    reads the table as it is."""
    import datasets
    import pyarrow as pa
    sl = rlray.StepLatents(str(tiny_model_dir("llama")), layers=[-1], threads=1)
    good = sl(pa.Table.from_pylist([{"id": "a", "question": "Tom has 3.", "steps": ["3 + 4 = 7.", "So 7."]},
                                    {"id": "b", "question": "q", "steps": []}]))
    want = pa.schema([("id", pa.string()), ("num_steps", pa.int32()), ("num_tokens", pa.int32()),
                      ("token_spans", pa.list_(pa.list_(pa.int32(), 2))),
                      ("latents", pa.list_(pa.list_(pa.float32(), sl._m.hidden_size))), ("error", pa.string())])
    assert good.schema == want
    assert good.column("latents").is_null().to_pylist() == [False, True]
    ds = datasets.Dataset(good)
    assert ds.with_format("numpy")[0]["latents"].shape == (2, sl._m.hidden_size)
    assert ds[1] == {"id": "b", "num_steps": None, "num_tokens": None, "token_spans": None, "latents": None,
                     "error": "empty step list"}
    bad = sl({"id": np.array(["b", "c"], dtype=object), "question": np.array(["q", "q"], dtype=object),
              "steps": np.array([np.array([], dtype=object), "not a list"], dtype=object)})
    assert bad.schema == want and bad.column("error").null_count == 0
    assert bad.column("latents").null_count == bad.column("num_steps").null_count == 2
    for empty in ({"id": np.array([], dtype=object), "question": np.array([], dtype=object),
                   "steps": np.array([], dtype=object)}, pa.Table.from_pylist([]).cast(pa.schema([])),
                  good.select(["id"]).slice(0, 0)):
        t = sl(empty)
        assert t.num_rows == 0 and t.schema == want, (empty, t.schema)


def test_pool_shape_counts_what_fits_on_each_node():
    """No cluster: an actor lives on one node, so a pool whose sums fit but
    whose workers do not fit node by node is refused at once (Ray would wait
    for the missing worker until the start timeout)."""
    two = [{"CPU": 1.5}, {"CPU": 1.5}]
    with pytest.raises(ValueError, match="node by node they hold 2"):
        rl_ray._pool_shape(two, 3, None, 1)
    assert rl_ray._pool_shape(two, 2, None, 1) == (2, 0.0, 1.0)
    assert rl_ray._pool_shape(two, None, None, None) == (2, 0.0, 1.5)     # one per node, its CPUs
    gpus = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 3}]
    assert rl_ray._pool_shape(gpus, None, None, None) == (4, 1.0, 1.0)
    with pytest.raises(ValueError, match="node by node they hold 1"):
        rl_ray._pool_shape(gpus, 2, 2, None)                              # 4 GPUs, but 2 on no two nodes
    with pytest.raises(ValueError, match="no node can hold one worker"):
        rl_ray._pool_shape([{"CPU": 2}], 1, 1, None)


# ------------------------------------------------------------ extract (local cluster)

def _extract(setup, out: Path, **kw) -> dict:
    model, data, *_ = setup
    return rlray.extract([str(data)], out, model=str(model), shard_size=SHARD,
                         layers=[int(x) for x in LAYERS.split(",")], progress=False, **kw)


def test_extract_is_the_single_process_run(clusters, setup, tmp_path):
    model, data, ref, *_ = setup
    clusters.local()
    seen = []
    s = _extract(setup, tmp_path / "out", workers=2, cpus_per_worker=0.5, on_shard=seen.append)
    assert snapshot(tmp_path / "out") == snapshot(ref)
    one = rl.extract_dataset([str(data)], str(model), tmp_path / "one", shard_size=SHARD,
                             layers=[1, -1], device="cpu", threads=1, progress=False)
    assert set(one) <= set(s) and s["ray"]["workers"] == 2
    for k in ("items", "steps", "errors", "tokens", "records", "complete", "shards_written", "error_kinds"):
        assert s[k] == one[k], k
    assert sorted(i["index"] for i in seen) == list(range(-(-N_RECORDS // SHARD)))
    assert sum(s["ray"]["shards_per_worker"].values()) == len(seen) and len(s["ray"]["shards_per_worker"]) == 2
    again = _extract(setup, tmp_path / "out", workers=1, cpus_per_worker=0.5)   # finished: a no-op
    assert again["noop"] and snapshot(tmp_path / "out") == snapshot(ref)


def test_a_per_token_run_is_the_single_process_run(clusters, setup, tmp_path):
    model, data, *_ = setup
    clusters.local()
    one = tmp_path / "one"
    rl.extract_dataset([str(data)], str(model), one, shard_size=SHARD, layers=[-1], pooling="none",
                       device="cpu", threads=1, progress=False)
    s = rlray.extract([str(data)], tmp_path / "out", model=str(model), shard_size=SHARD, layers=[-1],
                      pooling="none", workers=2, cpus_per_worker=0.5, progress=False)   # disk checked first
    assert s["complete"] and snapshot(tmp_path / "out") == snapshot(one)


def test_cli_ray_is_byte_identical(clusters, setup, tmp_path):
    *_, ref, cmd, env, _ = setup
    address = clusters.local()
    r = subprocess.run(cmd(tmp_path / "out", "--ray", "--address", address, "--workers", "2",
                           "--cpus-per-worker", "0.5"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on Ray: 2 workers" in r.stdout
    assert snapshot(tmp_path / "out") == snapshot(ref)


def test_cli_ray_starts_its_own_local_cluster(setup, tmp_path):
    *_, ref, cmd, env, _ = setup
    e = {k: v for k, v in env().items() if k != "RAY_ADDRESS"}
    r = subprocess.run(cmd(tmp_path / "out", "--ray", "--workers", "2", "--cpus-per-worker", "0.5"), env=e,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert snapshot(tmp_path / "out") == snapshot(ref)


def test_cli_refuses_ray_options_without_ray_and_single_process_options_with_it(setup, tmp_path, capsys):
    from rjepa_latent import cli
    model, data, *_ = setup
    base = ["extract", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main(base + ["--workers", "2"]) == 2
    assert "--workers need --ray" in capsys.readouterr().err
    for extra, what in ((["--device", "cuda:1"], "--device cuda:1 does not go with --ray"),
                        (["--device", "cpu", "--gpus-per-worker", "1"], "--device cpu (CPU workers) does not go"),
                        (["--device", "cuda", "--gpus-per-worker", "0"], "--device cuda (a GPU per worker)"),
                        (["--threads", "2"], "--threads does not go with --ray"),
                        (["--part", "1/2"], "--part does not go with --ray")):
        assert cli.main(base + ["--ray", *extra]) == 2
        assert what in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_device_with_ray_means_cpu_or_gpu_workers(setup, tmp_path, monkeypatch):
    """--device as without Ray: cpu -> CPU workers (0 GPUs each), cuda -> one GPU
    per worker, or the --gpus-per-worker given; no --device leaves Ray's default."""
    from rjepa_latent import cli
    from rjepa_latent.run import ray_cli
    model, data, *_ = setup
    seen = []

    def fake_extract(*a, **k):
        seen.append(k["gpus_per_worker"])
        raise ValueError("stop here")
    monkeypatch.setattr(ray_cli, "extract", fake_extract)
    base = ["extract", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress", "--ray"]
    for extra in (["--device", "cpu"], ["--device", "cuda"], ["--device", "cuda", "--gpus-per-worker", "2"], []):
        assert cli.main(base + extra) == 2
    assert seen == [0, 1, 2, None]


def test_without_ray_an_import_error_names_the_extra(setup, tmp_path, monkeypatch, capsys):
    from rjepa_latent import cli
    model, data, *_ = setup
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'ray\[data\]==2.60.0'"):
        rlray.extract([str(data)], tmp_path / "o", model=str(model))
    with pytest.raises(ImportError, match=r"pip install \"\.\[ray\]\" in a clone"):
        rlray.StepLatents(str(model))
    assert cli.main(["extract", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--ray"]) == 2
    assert "pip install 'ray[data]==2.60.0'" in capsys.readouterr().err


def test_the_cli_without_ray_does_not_import_ray(setup, tmp_path):
    model, data, *_ = setup
    code = ("import sys; from rjepa_latent import cli; "
            f"rc = cli.main(['extract', {str(data)!r}, '--model', {str(model)!r}, '--out', "
            f"{str(tmp_path / 'o')!r}, '--no-progress', '--device', 'cpu']); "
            "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray was imported'")
    r = subprocess.run([sys.executable, "-c", code], env=setup[4](), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_pool_larger_than_the_cluster_is_refused(clusters, setup, tmp_path):
    clusters.local()
    with pytest.raises(ValueError, match="the pool does not fit"):
        _extract(setup, tmp_path / "o", workers=5, cpus_per_worker=0.5)
    with pytest.raises(ValueError, match="the pool does not fit"):
        _extract(setup, tmp_path / "o", workers=1, gpus_per_worker=1)   # no GPU here
    with pytest.raises(ValueError, match="not an option"):
        _extract(setup, tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()


def test_a_second_driver_on_the_directory_is_refused(clusters, setup, tmp_path):
    *_, ref, cmd, env, _ = setup
    address = clusters.local()
    out = tmp_path / "out"
    holding, release = threading.Event(), threading.Event()
    result: dict = {}

    def pause(info):   # the first driver holds the directory, mid-run
        holding.set()
        release.wait(120)

    def first():
        try:
            result["summary"] = _extract(setup, out, workers=1, cpus_per_worker=0.5, on_shard=pause)
        except BaseException as e:   # reported below
            result["error"] = e
    t = threading.Thread(target=first)
    t.start()
    try:
        assert holding.wait(120), result
        r = subprocess.run(cmd(out, "--ray", "--address", address, "--workers", "1", "--cpus-per-worker",
                               "0.5"), env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "in use by another" in r.stderr, r.stderr[-3000:]
    finally:
        release.set()
        t.join(300)
    assert "error" not in result, result.get("error")
    assert snapshot(out) == snapshot(ref)


def test_an_actor_that_cannot_see_the_directory_is_named(clusters, setup, tmp_path):
    model, data, *_ = setup
    ray_mod, _ = rlray.connect(clusters.local())
    from rjepa_latent.run import ray as rl_ray
    from rjepa_latent.run import spec as rl_spec
    spec = rl_spec.run_spec([str(data)], model=str(model), shard_size=SHARD)
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    # the actor looks for the token in `elsewhere`, as a node whose mount differs would
    pool = rl_ray._Pool(ray_mod, str(model), spec, elsewhere, (1, 0.0, 0.5), "visibility")
    try:
        pool.start()
        with pytest.raises(rl.StoreError, match=r"not visible from every Ray node: .*w0 on node "):
            rl_ray._check_visible(pool, out)
    finally:
        pool.shutdown()


def test_actors_that_differ_in_engine_identity_are_refused(model_of, setup):
    from rjepa_latent.run import ray as rl_ray
    from rjepa_latent.run import spec as rl_spec
    model, data, *_ = setup
    config = rl_spec.run_config(rl_spec.run_spec([str(data)], model=str(model), shard_size=SHARD), model_of("llama"))
    here = {"host": "a", "device": "cpu", "config": config}
    other_kernel = {"host": "b", "device": "cpu", "config": {**config, "engine_kernel": config["engine_kernel"] + "x"}}
    with pytest.raises(rl.StoreError, match="(?s)differ in what they compute.*engine_kernel.*allow_kernel_change"):
        rl_ray._identity_check({"w0": here, "w1": other_kernel}, allow_kernel_change=False)
    assert rl_ray._identity_check({"w0": here, "w1": other_kernel}, allow_kernel_change=True) == config
    other_dtype = {**other_kernel, "config": {**config, "engine_dtype": "bfloat16"}}
    with pytest.raises(rl.StoreError, match="engine_dtype"):
        rl_ray._identity_check({"w0": here, "w1": other_dtype}, allow_kernel_change=True)
    budgets = [{**here, "config": {**config, "engine_batch_tokens": n}} for n in (8192, 4096)]   # as on CUDA
    with pytest.raises(rl.StoreError, match="pass one --max-batch-tokens"):
        rl_ray._identity_check({"w0": budgets[0], "w1": budgets[1]}, allow_kernel_change=True)


# ------------------------------------------------------------ two nodes

def test_two_nodes_share_the_work(clusters, setup, tmp_path):
    *_, ref, _, _, _ = setup
    clusters.two_nodes()
    s = _extract(setup, tmp_path / "out", workers=2, cpus_per_worker=0.5)
    assert s["ray"]["nodes"] == 2 and len(s["ray"]["shards_per_worker"]) == 2
    assert snapshot(tmp_path / "out") == snapshot(ref)
    with pytest.raises(ValueError, match="no node can hold one worker"):   # 2 CPUs, but 1 per node
        _extract(setup, tmp_path / "o", workers=1, cpus_per_worker=2)


@pytest.mark.parametrize("no_restart", [True, False])
def test_a_killed_actor_changes_nothing(clusters, setup, tmp_path, no_restart):
    *_, ref, _, _, _ = setup
    clusters.two_nodes()
    killed = []

    def kill_once(info):   # mid-run: the first committed shard's worker dies
        if not killed:
            killed.append(info["worker"])
            ray.kill(ray.get_actor(info["worker"]), no_restart=no_restart)
    s = _extract(setup, tmp_path / "out", workers=2, cpus_per_worker=0.5, on_shard=kill_once)
    assert s["ray"]["lost_workers"] >= 1 and s["ray"]["redone_shards"] >= 1, s["ray"]
    assert s["complete"] and snapshot(tmp_path / "out") == snapshot(ref)


def test_a_killed_driver_resumes_to_the_same_bytes(clusters, setup, tmp_path):
    *_, ref, cmd, env, _ = setup
    cluster = clusters.two_nodes()
    out = tmp_path / "out"
    p = subprocess.Popen(cmd(out, "--ray", "--address", cluster.address, "--workers", "2",
                             "--cpus-per-worker", "0.5"), env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not list(out.glob("shard-*.json")):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)   # as soon as the first shard is committed
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    s = _extract(setup, out, workers=2, cpus_per_worker=0.5)
    assert s["complete"] and s["shards_written"] < s["shards_total"]   # the committed ones were kept
    assert snapshot(out) == snapshot(ref)

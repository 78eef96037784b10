"""The token store (`rjepa-latent tokens`): exactly the run's rows with their
(record, position, token) keys, shuffled deterministically per seed, never
complete after a killed build, bounded memory; TokenBatches and
to_hf_dataset read it."""
import collections
import json
import subprocess
import sys

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from rjepa_latent.errors import StoreError
from rjepa_latent.store import token_store
from rjepa_latent.store.token_store import build_token_store, open_tokens
from rjepa_latent.testing import fake_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("ft") / "run", records=60, per_token=True, layers=[1, 2],
                    hidden=32, dtype="bfloat16", shard_size=25)


def _run_rows(run, layer_pos):
    """Counter of (record, position, token id, row bytes) over the run, read item by item."""
    out = collections.Counter()
    for i, it in enumerate(rl.open_latents(run)):
        for p, t, r in zip(it.token_key("token_positions"), it.token_key("token_ids"), it.raw_latents[layer_pos]):
            out[(i, int(p), int(t), r.tobytes())] += 1
    return out


def _store_rows(path, site):
    ts = open_tokens(path)
    out, order = collections.Counter(), []
    for c in range(ts.chunks):
        k, x = ts.keys(c), ts.chunk(site, c)
        assert len(x) == len(k["record"]) <= ts.config["chunk_rows"]
        for a, p, t, r in zip(k["record"], k["position"], k["token_id"], x):
            out[(int(a), int(p), int(t), r.tobytes())] += 1
            order.append((int(a), int(p)))
    return out, order


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_store_holds_exactly_the_runs_rows(tmp_path, run):
    m = build_token_store(run, tmp_path / "s", seed=7, chunk_rows=500, memory_bytes=64 << 10)
    assert m["config"]["buckets"] > 1   # the external path, not one in-memory permutation
    assert m["rows"] == sum(len(it.token_key("token_ids")) for it in rl.open_latents(run))
    for pos, site in enumerate(["layer-1", "layer-2"]):
        got, order = _store_rows(tmp_path / "s", site)
        assert got == _run_rows(run, pos)
        if pos == 0:
            first = order
        else:
            assert order == first   # every site in the same row order as the keys
    assert first != sorted(first)   # shuffled
    # the HF dataset: the same rows, widened to float32
    ds = open_tokens(tmp_path / "s").to_hf_dataset("layer-2")
    assert len(ds) == m["rows"] and ds.column_names == ["record", "position", "token_id", "x"]
    ts = open_tokens(tmp_path / "s")
    row = ds[3]
    np.testing.assert_array_equal(np.asarray(row["x"], np.float32), ts.chunk("layer-2", 0, raw=False)[3])
    assert (row["record"], row["position"]) == first[3]
    assert ts.ids == rl.open_latents(run).ids


def test_deterministic_per_seed_and_different_for_another(tmp_path, run):
    kw = dict(chunk_rows=400, memory_bytes=64 << 10)
    build_token_store(run, tmp_path / "a", seed=1, **kw)
    build_token_store(run, tmp_path / "b", seed=1, **kw)
    build_token_store(run, tmp_path / "c", seed=2, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["keys/chunk-00000.safetensors"] != c["keys/chunk-00000.safetensors"]
    assert _store_rows(tmp_path / "a", "layer-1")[0] == _store_rows(tmp_path / "c", "layer-1")[0]
    # building again over a finished store of the same options changes nothing; other options are refused
    build_token_store(run, tmp_path / "a", seed=1, **kw)
    assert _files(tmp_path / "a") == a
    with pytest.raises(StoreError, match="other options"):
        build_token_store(run, tmp_path / "a", seed=3, **kw)


def test_killed_build_never_reads_as_complete(tmp_path, run, monkeypatch):
    real = token_store._Chunks.flush
    calls = []

    def dying(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        real(self)
    monkeypatch.setattr(token_store._Chunks, "flush", dying)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(run, tmp_path / "s", seed=0, chunk_rows=500, memory_bytes=64 << 10)
    assert any((tmp_path / "s").rglob("chunk-*.safetensors"))
    with pytest.raises(StoreError, match="not a finished token store"):
        open_tokens(tmp_path / "s")
    from rjepa_latent.torch import TokenBatches
    with pytest.raises(StoreError, match="not a finished token store"):
        TokenBatches(tmp_path / "s", "layer-1", 8)
    monkeypatch.setattr(token_store._Chunks, "flush", real)
    build_token_store(run, tmp_path / "s", seed=0, chunk_rows=500, memory_bytes=64 << 10)   # starts over
    build_token_store(run, tmp_path / "t", seed=0, chunk_rows=500, memory_bytes=64 << 10)
    assert _files(tmp_path / "s") == _files(tmp_path / "t")


def test_token_batches(tmp_path, run):
    import torch
    from rjepa_latent.torch import TokenBatches
    build_token_store(run, tmp_path / "s", seed=5, chunk_rows=300, memory_bytes=64 << 10)
    ts = open_tokens(tmp_path / "s")
    want, order = _store_rows(tmp_path / "s", "layer-2")
    tb = TokenBatches(tmp_path / "s", "layer-2", 64, keys=True)
    got, got_order, sizes = collections.Counter(), [], []
    for x, k in tb:
        assert x.dtype == torch.bfloat16 and x.shape[1] == 32 and k.dtype == torch.int32
        sizes.append(len(x))
        for kk, r in zip(k.tolist(), x.view(torch.int16).numpy().view(np.uint16)):
            got[(kk[0], kk[1], kk[2], r.tobytes())] += 1
            got_order.append((kk[0], kk[1]))
    assert got == want and got_order == order   # no buffer: the store's own order
    assert sizes[:-1] == [64] * (len(sizes) - 1) and len(sizes) == len(tb) and sum(sizes) == ts.rows
    # a shuffle buffer: every row once per epoch, another order each epoch
    tb = TokenBatches(tmp_path / "s", "layer-2", 50, shuffle_buffer=700, keys=True, drop_last=True)
    epochs = []
    for e in range(2):
        tb.set_epoch(e)
        keys = [tuple(r) for _, k in tb for r in k.tolist()]
        assert len(keys) == ts.rows // 50 * 50 and len(set(keys)) == len(keys)
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    assert [(a, p) for a, p, _ in epochs[0]] != order[:len(epochs[0])]
    loader = torch.utils.data.DataLoader(TokenBatches(tmp_path / "s", "layer-1", 100), batch_size=None,
                                         num_workers=2)
    assert sum(len(x) for x in loader) == ts.rows


def test_cli_and_bad_input(tmp_path, run, capsys):
    assert cli_main(["tokens", str(run), "--out", str(tmp_path / "s"), "--layers", "2", "--seed", "4",
                     "--chunk-rows", "256", "--dtype", "float32", "--memory", "1"]) == 0
    ts = open_tokens(tmp_path / "s")
    assert ts.sites == ["layer-2"] and ts.dtype == "float32" and ts.chunk("layer-2", 0).dtype == np.float32
    widened = collections.Counter({(a, p, t, np.frombuffer(r, np.uint16).astype(np.uint32).__lshift__(16)
                                    .view(np.float32).tobytes()): n for (a, p, t, r), n in _run_rows(run, 1).items()})
    assert _store_rows(tmp_path / "s", "layer-2")[0] == widened
    pooled = fake_run(tmp_path / "pooled", records=5)
    assert cli_main(["tokens", str(pooled), "--out", str(tmp_path / "x")]) == 2
    assert "not a per-token run" in capsys.readouterr().err
    assert cli_main(["tokens", str(run), "--out", str(tmp_path / "y"), "--sites", "blocks.0.hook_z"]) == 2
    assert "site 'blocks.0.hook_z' is not in" in capsys.readouterr().err
    assert cli_main(["tokens", str(run), "--out", str(tmp_path / "y"), "--layers", "0"]) == 2
    assert "layer 0 is not in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chunk_rows"):
        build_token_store(run, tmp_path / "z", chunk_rows=0)
    with pytest.raises(KeyError, match="not in this token store"):
        ts.chunk("layer-1", 0)


def test_memory_does_not_grow_with_rows(tmp_path):
    """Peak RSS of a build over 4x the rows stays within a few MiB of the smaller one's."""
    code = (
        "import sys\n"
        "from rjepa_latent.store.token_store import build_token_store\n"
        "build_token_store(sys.argv[1], sys.argv[2], chunk_rows=1024, memory_bytes=4 << 20)\n"
        # VmHWM (peak RSS) starts afresh at exec; ru_maxrss would carry the parent's
        "print([int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0])\n")
    peaks = []
    for records in (40, 160):
        src = fake_run(tmp_path / f"r{records}", records=records, per_token=True, hidden=512, shard_size=40)
        out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / f"s{records}")],
                             capture_output=True, text=True, check=True)
        rows = json.loads((tmp_path / f"s{records}" / "manifest.json").read_text())["rows"]
        peaks.append((rows, int(out.stdout.strip()) * 1024))
    (small_rows, small), (big_rows, big) = peaks
    assert big_rows > 3.5 * small_rows and big_rows * 512 * 4 > 40 << 20   # the data is over 40 MiB
    assert big - small < 12 << 20, peaks

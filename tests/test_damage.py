"""Damage to a finished run, as a table: each case changes a copy of one small
run (tiny qwen3, 12 records, shards of 4, layers 1 and 2, poolings mean and
max) the way a disk, a copy or a hand can, and has one exact outcome:

- every reader refuses it with a StoreError naming the file: open_latents
  (item access and iteration), LatentDataset, the Arrow table / HF Dataset,
  Parquet and npy export (`served`: False for strays, which no reader maps);
- `rjepa-latent verify` names the file (exit 1), and `verify --quick` too
  when `quick` (a header or manifest problem, not a payload one);
- a plain resume refuses, naming the file (never "already complete");
- `extract --repair` either mends it (`mend`: the run ends byte-identical to
  the untouched one, a second --repair has nothing to do and verify agrees)
  or refuses, naming the file, with nothing changed (`mend=False`: a manifest
  whose configuration was edited cannot be rebuilt).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import StoreError
from rjepa_latent.cli import main as cli_main
from rjepa_latent.store import export as rl_export
from rjepa_latent.store import integrity
from rjepa_latent.store.files import verify_run
from rjepa_latent.store.integrity import MANIFEST_SHA256
from rjepa_latent.store.read import arrow_table
from rjepa_latent.testing import sample_records, tiny_model, write_records

SHARD = 4
OPTS = dict(shard_size=SHARD, layers=(1, 2), pooling=["mean", "max"], progress=False)


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    data = write_records(root / "data.jsonl", sample_records(12, 0))
    model = rl.Model(tiny_model(root / "weights_a", seed=0), device="cpu")
    other = rl.Model(tiny_model(root / "weights_b", seed=1), device="cpu")  # same shapes, other weights
    ref, foreign = root / "reference", root / "other_weights"
    assert rl.extract_dataset(data, model, ref, **OPTS)["complete"]
    assert rl.extract_dataset(data, other, foreign, **OPTS)["complete"]
    stray_src = root / "longer"   # a run of more records: its shard 9 is a stray here
    rl.extract_dataset(write_records(root / "long.jsonl", sample_records(40, 3)), model, stray_src,
                       **OPTS)
    yield SimpleNamespace(root=root, data=data, model=model, ref=ref, foreign=foreign,
                          stray_src=stray_src, snap=snapshot(ref))
    model.close()
    other.close()


# ------------------------------------------------------------ damage kinds

def _header(p: Path) -> tuple[int, dict]:
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return n, json.loads(b[8:8 + n])


def flip_in(tensor: str, restore_times: bool = False):
    """Flip one byte inside `tensor` of shard 1 (optionally restoring the file's times)."""
    def damage(out: Path, w) -> None:
        p = out / "shard-00001.safetensors"
        st = os.stat(p)
        n, h = _header(p)
        a, b = h[tensor]["data_offsets"]
        data = bytearray(p.read_bytes())
        data[8 + n + (a + b) // 2] ^= 0x10
        p.write_bytes(bytes(data))
        if restore_times:   # a writer that hides its write: only ctime still tells
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    return damage


def other_weights(out: Path, w) -> None:
    shutil.copy(w.foreign / "shard-00001.safetensors", out / "shard-00001.safetensors")


def swapped_offsets(out: Path, w) -> None:
    """latents and latents.max (one shape) swap their data_offsets; the header is
    re-padded to its length, so sizes, dtypes and shapes all still agree."""
    p = out / "shard-00001.safetensors"
    n, h = _header(p)
    h["latents"]["data_offsets"], h["latents.max"]["data_offsets"] = (
        h["latents.max"]["data_offsets"], h["latents"]["data_offsets"])
    text = json.dumps(h, separators=(",", ":")).encode()
    assert len(text) <= n
    b = p.read_bytes()
    p.write_bytes(b[:8] + text.ljust(n) + b[8 + n:])


def edit_manifest(change: Callable[[dict], None], keep_hash: bool = True):
    def damage(out: Path, w) -> None:
        p = out / "manifest.json"
        m = json.loads(p.read_text())
        change(m)
        if not keep_hash:
            m.pop(MANIFEST_SHA256)
        p.write_text(json.dumps(m, indent=1) + "\n")
    return damage


def stray(exts=("safetensors", "jsonl", "json")):
    """Shard 99 of a longer run (its journal entry made that of shard 99: a whole, sound shard)."""
    def damage(out: Path, w) -> None:
        for ext in exts:
            src = w.stray_src / f"shard-00009.{ext}"
            if ext == "json":
                e = json.loads(src.read_text())
                e.update(index=99, records=[99 * SHARD, 100 * SHARD],
                         files={k.replace("00009", "00099"): v for k, v in e["files"].items()})
                (out / "shard-00099.json").write_text(json.dumps(e, separators=(",", ":")) + "\n")
            else:
                shutil.copy(src, out / f"shard-00099.{ext}")
    return damage


def _set(path: tuple, value):
    def change(m: dict) -> None:
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


def _drop_entry(m: dict) -> None:
    del m["shards"][1]


@dataclass
class Damage:
    name: str
    apply: Callable
    file: str               # what every refusal names
    quick: bool = False     # verify --quick finds it too
    mend: bool = True       # --repair mends it (else refuses, changing nothing)
    served: bool = True     # a reader would map it (strays are never mapped)


CASES = [
    Damage("flip_latents", flip_in("latents"), "shard-00001.safetensors"),
    Damage("flip_latents_max", flip_in("latents.max"), "shard-00001.safetensors"),
    Damage("flip_token_spans", flip_in("token_spans"), "shard-00001.safetensors"),
    Damage("flip_with_times_restored", flip_in("latents", restore_times=True), "shard-00001.safetensors"),
    Damage("other_weights_shard", other_weights, "shard-00001.safetensors"),
    Damage("swapped_data_offsets", swapped_offsets, "shard-00001.safetensors", quick=True),
    Damage("layers_reordered", edit_manifest(_set(("config", "layers"), [2, 1])), "manifest.json",
           quick=True),
    Damage("layers_changed", edit_manifest(_set(("config", "layers"), [0, 2])), "manifest.json",
           quick=True),
    Damage("layers_reordered_hash_dropped", edit_manifest(_set(("config", "layers"), [2, 1]),
                                                          keep_hash=False), "manifest.json", quick=True),
    Damage("inputs_edited", edit_manifest(_set(("config", "dataset_sha256"), "0" * 64)), "manifest.json",
           quick=True, mend=False),
    Damage("num_records_lowered", edit_manifest(_set(("num_records",), 10)), "manifest.json", quick=True),
    Damage("shard_entry_deleted", edit_manifest(_drop_entry), "manifest.json", quick=True),
    Damage("num_records_lowered_hash_dropped", edit_manifest(_set(("num_records",), 10), keep_hash=False),
           "manifest.json", quick=True),
    Damage("shard_entry_deleted_hash_dropped", edit_manifest(_drop_entry, keep_hash=False),
           "manifest.json", quick=True),
    Damage("stray_triple", stray(), "shard-00099.safetensors", quick=True, served=False),
    Damage("stray_data_file_only", stray(("safetensors",)), "shard-00099.safetensors", quick=True,
           served=False),
    Damage("stray_journal_entry_only", stray(("json",)), "shard-00099.json", quick=True, served=False),
]


def _read_everything(out: Path) -> None:
    for it in rl.open_latents(out):
        it.latents.sum(), it.pooled("max").sum(), it.token_spans.sum()


def _readers(out: Path, tmp: Path) -> dict[str, Callable[[], object]]:
    from rjepa_latent.torch import LatentDataset
    return {
        "open_latents_items": lambda: [rl.open_latents(out)[i].pooled("max").sum() for i in range(12)],
        "open_latents_iteration": lambda: _read_everything(out),
        "LatentDataset": lambda: [x for x in LatentDataset(out, layer=1)],
        "arrow_table": lambda: arrow_table(rl.open_latents(out), layer=2, pooling="max"),
        "hf_dataset": lambda: rl.open_latents(out).to_hf_dataset(layer=1),
        "parquet": lambda: rl_export.export_parquet(rl.open_latents(out), tmp / "x.parquet", layer=1),
        "npy": lambda: rl_export.export_npy(rl.open_latents(out), tmp / "npy"),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_damage(case: Damage, world, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(world.ref, out)
    case.apply(out, world)
    named = str(out / case.file)
    # every reader: refused, naming the file
    if case.served:
        for reader, fn in _readers(out, tmp_path).items():
            with pytest.raises(StoreError, match=named.replace(".", r"\.")):
                fn()
                pytest.fail(f"{reader} served {case.name}")
    # verify (and --quick when the damage is in a header or the manifest)
    for quick in (False, True):
        bad = verify_run(out, full=not quick)
        if quick and not case.quick:
            assert case.file not in bad
            continue
        assert case.file in bad, (quick, bad)
        assert cli_main(["verify", str(out), "--no-progress"] + (["--quick"] if quick else [])) == 1
        assert named in capsys.readouterr().out
    # info and export refuse an edited manifest
    if case.file == "manifest.json":
        assert cli_main(["info", str(out)]) != 0
        assert cli_main(["export", str(out), "--format", "npy", "--out", str(tmp_path / "e")]) != 0
        err = capsys.readouterr().err
        assert err.count(named) == 2 and "Traceback" not in err, err
    # a plain resume refuses (never "already complete"), changing nothing
    before = snapshot(out)
    with pytest.raises(StoreError, match=named.replace(".", r"\.")):
        rl.extract_dataset(world.data, world.model, out, **OPTS)
    assert snapshot(out) == before
    capsys.readouterr()
    # --repair mends it, or refuses an edit it cannot undo
    if not case.mend:
        with pytest.raises(StoreError, match=named.replace(".", r"\.") + "(?s:.*)configuration"):
            rl.extract_dataset(world.data, world.model, out, repair=True, **OPTS)
        assert snapshot(out) == before
        return
    s = rl.extract_dataset(world.data, world.model, out, repair=True, **OPTS)
    assert s["complete"]
    assert snapshot(out) == world.snap
    if not case.served:
        moved = sorted(f"quarantine/{p.name}" for p in (out / "quarantine").iterdir())
        assert sorted(s["quarantined"]) == moved
        assert any(q.endswith(case.file) for q in s["quarantined"])
    assert verify_run(out) == {}
    again = rl.extract_dataset(world.data, world.model, out, repair=True, **OPTS)
    assert again["noop"] and again["repaired"] == [] and again["quarantined"] == []
    _read_everything(out)


def test_the_table_covers_the_damage_kinds():
    names = {c.name for c in CASES}
    assert len(names) == len(CASES) >= 15
    assert {c.file for c in CASES} >= {"shard-00001.safetensors", "manifest.json", "shard-00099.json"}


# ------------------------------------------------------------ when the payload is hashed

def _count_hashes(monkeypatch) -> dict:
    """Count the payload hashes of readers (per mapping) and of resumes (per file)."""
    seen = {"reader": 0, "resume": 0}
    real_sha, real_file = integrity.payload_sha256, integrity.hash_file

    def sha(buf):
        seen["reader"] += 1
        return real_sha(buf)

    def file_sha(path):
        seen["resume"] += 1
        return real_file(path)
    monkeypatch.setattr(integrity, "payload_sha256", sha)
    monkeypatch.setattr(integrity, "hash_file", file_sha)
    return seen


def test_a_reader_hashes_each_shard_once_per_process_and_again_when_it_changes(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(world.ref, out)
    integrity._seen.clear()
    seen = _count_hashes(monkeypatch)
    _read_everything(out)
    assert seen["reader"] == 3            # three shards, each hashed on its first mapping
    _read_everything(out)
    list(rl.open_latents(out))            # other stores of the same process: no new hash
    assert seen["reader"] == 3
    flip_in("latents", restore_times=True)(out, world)   # same size and mtime: ctime tells
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: its sha256 differs"):
        _read_everything(out)
    assert seen["reader"] == 4


def test_the_opt_out_serves_a_verified_run_without_hashing(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(world.ref, out)
    flip_in("latents")(out, world)        # invisible without the payload hash: the opt-out's risk
    integrity._seen.clear()
    seen = _count_hashes(monkeypatch)
    assert len([it.latents for it in rl.open_latents(out, check="header")]) == 12
    monkeypatch.setenv("RJEPA_TRUST_SHARDS", "1")
    from rjepa_latent.torch import LatentDataset
    assert len([x for x in LatentDataset(out, layer=1)]) == 12
    assert seen["reader"] == 0
    with pytest.raises(StoreError, match="sha256 differs"):   # an explicit check wins
        [it.latents for it in rl.open_latents(out, check="payload")]
    with pytest.raises(ValueError, match="check must be one of 'payload', 'header'"):
        rl.open_latents(out, check="none")


def test_a_resume_hashes_only_what_was_not_checked_since_its_commit(world, tmp_path, monkeypatch):
    monkeypatch.setenv("RJEPA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    integrity._seen.clear()
    rl.extract_dataset(world.data, world.model, out, **OPTS)
    seen = _count_hashes(monkeypatch)
    integrity._seen.clear()               # another process: only the notes on disk remain
    assert rl.extract_dataset(world.data, world.model, out, **OPTS)["noop"]
    assert seen["resume"] == 0            # every shard was noted by its writer
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)           # other files (paths, inodes): each hashed once
    assert rl.extract_dataset(world.data, world.model, moved, **OPTS)["noop"]
    assert seen["resume"] == 3
    integrity._seen.clear()
    assert rl.extract_dataset(world.data, world.model, moved, **OPTS)["noop"]
    assert seen["resume"] == 3
    flip_in("latents", restore_times=True)(out, world)
    with pytest.raises(StoreError, match=r"(?s)damaged or missing.*shard-00001\.safetensors: sha256 differs"):
        rl.extract_dataset(world.data, world.model, out, **OPTS)
    assert seen["resume"] == 4


def test_a_flipped_byte_in_a_partial_run_is_found_by_a_plain_resume(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world.ref, out)
    m = json.loads((out / "manifest.json").read_text())
    start = {k: m[k] for k in ("format", "format_version", "config")} | {"complete": False}
    (out / "manifest.json").write_text(json.dumps(start) + "\n")   # no hash: a start manifest of 0.3
    (out / "errors.jsonl").unlink()
    for ext in ("safetensors", "jsonl", "json"):
        (out / f"shard-00002.{ext}").unlink()
    flip_in("latents.max")(out, world)
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: sha256 differs"):
        rl.extract_dataset(world.data, world.model, out, **OPTS)
    s = rl.extract_dataset(world.data, world.model, out, repair=True, **OPTS)
    assert s["repaired"] == [1] and s["complete"] and snapshot(out) == world.snap


def _renamed_copy(out: Path, w) -> None:
    """Shard 9 of a longer run copied as shard 99, its journal entry unchanged."""
    for ext in ("safetensors", "jsonl", "json"):
        shutil.copy(w.stray_src / f"shard-00009.{ext}", out / f"shard-00099.{ext}")


@pytest.mark.parametrize("kind", ["whole_shard", "renamed_copy"])
def test_a_stray_in_a_partial_run_is_quarantined_when_the_run_finishes(world, tmp_path, capsys, kind):
    out = tmp_path / "run"
    shutil.copytree(world.ref, out)
    m = json.loads((out / "manifest.json").read_text())
    start = {k: m[k] for k in ("format", "format_version", "config")} | {"complete": False}
    (out / "manifest.json").write_text(json.dumps(start) + "\n")
    (out / "errors.jsonl").unlink()
    (stray() if kind == "whole_shard" else _renamed_copy)(out, world)
    # a whole shard 99 cannot be told from a later one until the inputs are read; a
    # renamed copy's journal entry is another shard's, found at once
    said = (r"(?s)beyond the 12 records.*shard-00099\.json: a stray.*--repair" if kind == "whole_shard"
            else r"(?s)damaged or missing.*shard-00099\.json: not the journal entry of shard 99")
    with pytest.raises(StoreError, match=said):
        rl.extract_dataset(world.data, world.model, out, **OPTS)
    rc = cli_main(["extract", str(world.data), "--model", str(world.root / "weights_a"), "--device", "cpu",
                   "--no-progress", "--out", str(out), "--shard-size", str(SHARD), "--layers", "1,2",
                   "--pooling", "mean,max", "--repair"])
    err = capsys.readouterr().err
    assert rc == 0 and "moved files that are not this run's into quarantine/" in err, err
    assert "no shard was damaged" in err, err
    assert sorted(p.name for p in (out / "quarantine").iterdir()) == [
        "shard-00099.json", "shard-00099.jsonl", "shard-00099.safetensors"]
    assert snapshot(out) == world.snap and verify_run(out) == {}
    assert rl.extract_dataset(world.data, world.model, out, repair=True, **OPTS)["noop"]


def test_an_edited_manifest_is_rebuilt_from_the_journal_through_the_cli(world, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(world.ref, out)
    edit_manifest(_drop_entry)(out, world)
    args = ["extract", str(world.data), "--model", str(world.root / "weights_a"), "--device", "cpu",
            "--no-progress", "--out", str(out), "--shard-size", str(SHARD), "--layers", "1,2",
            "--pooling", "mean,max"]
    assert cli_main(args) != 0
    err = capsys.readouterr().err
    assert str(out / "manifest.json") in err and "--repair" in err and "Traceback" not in err, err
    assert cli_main(args + ["--repair"]) == 0
    assert "rebuilding it from the shards' journal entries" in capsys.readouterr().err
    assert snapshot(out) == world.snap


def test_notes_are_best_effort(tmp_path, monkeypatch):
    """A cache directory that cannot be written costs hashes, never a failed run."""
    from rjepa_latent.store.files import listed_shards, read_manifests
    from rjepa_latent.testing import fake_run
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("x")
    monkeypatch.setenv("RJEPA_CACHE_DIR", str(blocker))
    run = fake_run(tmp_path / "run", records=10, shard_size=5)
    integrity._seen.clear()
    seen = _count_hashes(monkeypatch)
    assert integrity.unchecked_payloads(run, listed_shards(read_manifests(run))) == {}
    assert seen["resume"] == 2 and verify_run(run) == {}


def test_growth_trusts_only_checked_shards(world, tmp_path):
    """Records appended to the data grow a finished run: its shards are checked first."""
    out, data = tmp_path / "run", tmp_path / "data.jsonl"
    shutil.copytree(world.ref, out)
    data.write_bytes(world.data.read_bytes())
    flip_in("token_spans", restore_times=True)(out, world)
    with open(data, "a") as f:
        f.write(world.data.read_text().splitlines()[0].replace('"id": "', '"id": "more-') + "\n")
    before = snapshot(out)
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: sha256 differs"):
        rl.extract_dataset(data, world.model, out, **OPTS)
    assert snapshot(out) == before
    s = rl.extract_dataset(data, world.model, out, repair=True, **OPTS)
    assert s["complete"] and s["grown"] and 1 in s["repaired"] and verify_run(out) == {}

"""Run identity: a run directory's configuration names the engine that computed
its bytes (backend, compute dtype, kernel, package version); a resume under
another engine is refused naming the field, the directory untouched;
allow_kernel_change (--allow-kernel-change) lets a resume continue under another
kernel only, each shard recording its kernel; an older run without these
fields is refused with that reason."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rjepa_latent as rl
from rjepa_latent.run import local as rl_local
from rjepa_latent.run import spec as rl_spec
from rjepa_latent.cli import main as cli_main
from rjepa_latent.store.files import ENGINE_IDENTITY
from rjepa_latent.store.integrity import config_digest
from conftest import interrupt_at_shard

OTHER_KERNEL = "scipy-openblas32 OpenBLAS 0.3.0 SkylakeX (another machine)"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "steps": [f"step {i}", "then more"]}) + "\n"
                         for i in range(9)))
    return p


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def partial_run(data: Path, model, out: Path, monkeypatch, edit) -> None:
    """A run interrupted after shard 0, then its manifest edited by `edit(config, shards)`
    as if another engine had written it."""
    compute = interrupt_at_shard(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        rl.extract_dataset(data, model, out, shard_size=3, progress=False)
    monkeypatch.setattr(rl_local._Runner, "_compute", compute)
    m = manifest(out)   # the start manifest: the configuration; the shards are in the journal
    assert not m["complete"] and "shards" not in m
    journal = sorted(out.glob("shard-*.json"))
    assert [p.name for p in journal] == ["shard-00000.json"]
    shards = [json.loads(p.read_text()) for p in journal]
    edit(m["config"], shards)
    m.pop("manifest_sha256")   # an older writer's manifest: no content hash
    (out / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    for p, entry in zip(journal, shards):
        entry["config_sha256"] = config_digest(m["config"])   # as that engine wrote its entries
        p.write_text(json.dumps(entry) + "\n")


def test_config_records_the_engine(model, data, tmp_path):
    rl.extract_dataset(data, model, tmp_path / "run", shard_size=3, progress=False)
    m = manifest(tmp_path / "run")
    cfg = m["config"]
    assert {k: cfg[k] for k in ENGINE_IDENTITY} == {
        "engine_backend": "cpu", "engine_dtype": "float32", "engine_kernel": model.kernel,
        "package_version": rl.__version__}
    assert model.kernel and model.kernel == model._engine.kernel
    assert set(rl_spec.engine_identity(model)) == set(ENGINE_IDENTITY)
    assert "device_kind" not in cfg  # replaced by engine_backend
    assert [s["kernel"] for s in m["shards"]] == [model.kernel] * 3


@pytest.mark.parametrize("field,value", [
    ("engine_kernel", OTHER_KERNEL), ("engine_dtype", "bfloat16"), ("engine_backend", "cuda"),
    ("package_version", "0.0.1"),
])
def test_resume_under_another_engine_is_refused_untouched(model, data, tmp_path, monkeypatch,
                                                          field, value):
    out = tmp_path / "run"
    partial_run(data, model, out, monkeypatch, lambda cfg, shards: cfg.update({field: value}))
    before = snapshot(out)
    with pytest.raises(rl.StoreError, match=re.escape(f"{field}: stored '{value}', requested")) as e:
        rl.extract_dataset(data, model, out, shard_size=3, progress=False)
    assert ("--allow-kernel-change" in str(e.value)) == (field == "engine_kernel")
    if field != "engine_kernel":  # the option relaxes the kernel only
        with pytest.raises(rl.StoreError, match=rf"{field}: stored"):
            rl.extract_dataset(data, model, out, shard_size=3, progress=False,
                               allow_kernel_change=True)
    assert snapshot(out) == before


def test_allow_kernel_change_continues_and_records_each_shards_kernel(model, data, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "run"

    def other_machine(cfg, shards):
        cfg["engine_kernel"] = OTHER_KERNEL
        shards[0]["kernel"] = OTHER_KERNEL
    partial_run(data, model, out, monkeypatch, other_machine)
    s = rl.extract_dataset(data, model, out, shard_size=3, progress=False, allow_kernel_change=True)
    assert s["complete"] and s["shards_written"] == 2
    m = manifest(out)
    assert m["config"]["engine_kernel"] == OTHER_KERNEL  # the run's configuration is kept
    assert [sh["kernel"] for sh in m["shards"]] == [OTHER_KERNEL, model.kernel, model.kernel]
    store = rl.open_latents(out)
    assert store.complete and len(store) == 9
    assert [sh["kernel"] for sh in store.shards] == [OTHER_KERNEL, model.kernel, model.kernel]
    # finished: a later plain call is still refused (the kernel differs), with the option a no-op
    with pytest.raises(rl.StoreError, match="engine_kernel: stored"):
        rl.extract_dataset(data, model, out, shard_size=3, progress=False)
    assert rl.extract_dataset(data, model, out, shard_size=3, progress=False,
                              allow_kernel_change=True)["noop"]


def test_cli_allow_kernel_change(data, tmp_path, tiny_model_dir, monkeypatch, capsys):
    model = rl.Model(tiny_model_dir("llama"), device="cpu", threads=1)
    out = tmp_path / "run"
    partial_run(data, model, out, monkeypatch,
                lambda cfg, shards: cfg.update(engine_kernel=OTHER_KERNEL))
    args = ["extract", str(data), "--model", str(tiny_model_dir("llama")), "--device", "cpu",
            "--no-progress", "--shard-size", "3", "--threads", "1", "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "engine_kernel: stored" in err and "--allow-kernel-change" in err
    assert cli_main([*args, "--allow-kernel-change"]) == 0
    assert rl.open_latents(out).complete


def test_old_run_without_engine_identity_is_refused(model, data, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def old_format(cfg, shards):
        for k in ENGINE_IDENTITY:
            del cfg[k]
        cfg["device_kind"] = "cpu"
        for sh in shards:
            del sh["kernel"]
    partial_run(data, model, out, monkeypatch, old_format)
    before = snapshot(out)
    for allow in (False, True):
        with pytest.raises(rl.StoreError, match=r"does not record which engine computed it "
                                                r"\(no engine_backend, engine_dtype, engine_kernel, "
                                                r"package_version.*older rjepa-latent"):
            rl.extract_dataset(data, model, out, shard_size=3, progress=False,
                               allow_kernel_change=allow)
    assert snapshot(out) == before
    assert len(rl.open_latents(out)) == 3  # still readable

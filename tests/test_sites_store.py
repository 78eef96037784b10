"""Runs of activation sites (`extract_dataset(sites=...)`, `rjepa-latent extract
--sites`): a tensor per site and pooling in each shard, listed in the
manifest's config and the shard header; `open_latents(run)[i].site(name)`
equals `Model.activations` (per token) and its pooling over the steps; the
torch, HF datasets, Parquet and npy readers give the same rows; a resume
with other sites is refused; bad names are refused before anything is
written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.cli import main as cli_main
from rjepa_latent.errors import LayerError, StoreError
from rjepa_latent.store import export as rl_export
from rjepa_latent.testing import tiny_model

SITES = ["blocks.0.attn.hook_z", "blocks.-1.hook_resid_post", "blocks.1.mlp.hook_post",
         "blocks.0.hook_attn_out"]
CANON = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post",
         "blocks.0.hook_attn_out"]


def _records(n=7):
    return [{"id": f"r{i}", "question": f"Question {i}: how many apples?",
             "steps": [f"Step {k}: {i} + {k} = {i + k}." for k in range(1 + i % 3)]}
            for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sites")
    path = tiny_model(d / "m", family="gemma2", layers=2)
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    m = rl.Model(path, device="cpu")
    yield d, path, data, m
    m.close()


def _header(p: Path) -> dict:
    raw = p.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])


def test_per_token_run_of_sites(setup):
    d, path, data, m = setup
    out = d / "tok"
    s = rl.extract_dataset(data, m, out, sites=SITES, pooling="none", shard_size=3, progress=False)
    assert s["items"] == 7
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert cfg["sites"] == CANON and cfg["layers"] == []
    assert cfg["site_widths"] == [64, 64, 128, 64]
    h = _header(out / "shard-00000.safetensors")
    assert h["__metadata__"]["sites"] == ",".join(CANON)
    assert [k for k in h if k.startswith("blocks.")] == CANON
    store = rl.open_latents(out)
    assert store.sites == CANON
    for i in range(len(store)):
        item = store[i]
        assert item.latents is None and item.sites == CANON
        n = item.site(CANON[0]).shape[0]
        assert n == item.meta["num_tokens"]
        assert item.site("blocks.-1.hook_resid_post").shape == (n, 64)
        assert item.site("blocks.1.mlp.hook_post").shape == (n, 128)
    # the stored rows are Model.activations of the stored record's tokens
    first = store[0]
    ids = _ids_of(m, data, out, 0)
    acts = m.activations(ids, SITES)
    for name in CANON:
        np.testing.assert_array_equal(first.site(name), acts[name])
    with pytest.raises(KeyError, match="not in this run"):
        first.site("blocks.0.hook_resid_pre")
    with pytest.raises(LayerError, match="unknown site"):
        first.site("blocks.0.resid_pre")


def _ids_of(m, data, out, i):
    """The token ids the run extracted for record i (its tokenizer, template)."""
    from rjepa_latent.run.spec import run_spec, run_tokenizer
    from rjepa_latent.inputs.tokenize import tokenize_records
    spec = run_spec(data, model=m, sites=SITES)
    recs = list(spec.records())
    item = tokenize_records(run_tokenizer(spec, m), [recs[i]], None)[0]
    return np.asarray(item.ids)


def test_pooled_run_of_sites_and_readers(setup):
    d, path, data, m = setup
    out = d / "pooled"
    rl.extract_dataset(data, m, out, sites=SITES, pooling=["mean", "max"], shard_size=4,
                       progress=False)
    store = rl.open_latents(out)
    for i in range(len(store)):
        item = store[i]
        ids = _ids_of(m, data, out, i)
        acts = m.activations(ids, SITES)
        for name in CANON:
            want = np.stack([acts[name][a:b].mean(0) for a, b in item.token_spans])
            np.testing.assert_allclose(item.site(name), want, rtol=0, atol=1e-5)
            want_max = np.stack([acts[name][a:b].max(0) for a, b in item.token_spans])
            np.testing.assert_array_equal(item.site(name, "max"), want_max)
    # readers: HF datasets / Arrow, Parquet, npy, torch give the same rows
    name = "blocks.1.mlp.hook_post"
    ds = store.to_hf_dataset(name, pooling="max")
    np.testing.assert_array_equal(np.asarray(ds[2]["latents"], np.float32), store[2].site(name, "max"))
    res = rl_export.export_npy(store, d / "npy")
    assert sorted(res["files"])[:4] == sorted(f"{c}.npy" for c in CANON)
    flat = np.load(d / "npy" / f"{name}.npy")
    offs = np.load(d / "npy" / "step_offsets.npy")
    np.testing.assert_array_equal(flat[offs[3]:offs[4]], store[3].site(name))
    import pyarrow.parquet as pq
    rl_export.export_parquet(store, d / "x.parquet", "blocks.-1.hook_resid_post")
    t = pq.read_table(d / "x.parquet")
    np.testing.assert_array_equal(np.asarray(t.column("latents")[1].as_py(), np.float32),
                                  store[1].site("blocks.1.hook_resid_post"))
    assert json.loads(t.schema.metadata[b"rjepa_latent"])["site"] == "blocks.1.hook_resid_post"
    torch = pytest.importorskip("torch")
    from rjepa_latent.torch import LatentDataset
    tds = LatentDataset(out, layer="blocks.0.attn.hook_z", pooling="max")
    assert torch.equal(tds[5]["latents"], torch.from_numpy(np.array(store[5].site(CANON[0], "max"))))
    with pytest.raises(ValueError, match="stores activation sites, not layers"):
        LatentDataset(out)   # the default layer -2 names no site
    with pytest.raises(ValueError, match="not in this run"):
        LatentDataset(out, layer="blocks.0.hook_resid_pre")


def test_resume_refuses_other_sites_and_cli(setup, capsys):
    d, path, data, m = setup
    out = d / "cli"
    rc = cli_main(["extract", str(data), "--model", str(path), "--out", str(out), "--device", "cpu",
                   "--sites", "blocks.-1.hook_resid_post,blocks.0.attn.hook_z", "--pooling", "last",
                   "--no-progress"])
    assert rc == 0
    store = rl.open_latents(out)
    assert store.sites == ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
    # the same sites, resolved the same, resume (nothing to do); others are refused
    again = rl.extract_dataset(data, m, out, sites=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"],
                               pooling="last", progress=False)
    assert again["items"] == 7
    with pytest.raises(StoreError, match="sites"):
        rl.extract_dataset(data, m, out, sites=["blocks.1.hook_resid_post"], pooling="last",
                           progress=False)
    rc = cli_main(["export", str(out), "--format", "npy", "--out", str(d / "clinpy"),
                   "--layer", "blocks.-1.hook_resid_post"])
    assert rc == 0 and (d / "clinpy" / "blocks.1.hook_resid_post.npy").exists()


def test_bad_sites_refused_before_writing(setup):
    d, path, data, m = setup
    for bad, match in ((["blocks.0.hook_resid"], "unknown site"),
                       (["blocks.2.hook_resid_pre"], "block 2 is out of range"),
                       (["blocks.-3.hook_mlp_out"], "block -3")):
        out = d / "bad"
        with pytest.raises(LayerError, match=match):
            rl.extract_dataset(data, path, out, sites=bad, device="cpu", progress=False)
        assert not out.exists()
    with pytest.raises(ValueError, match="layers or sites, not both"):
        rl.extract_dataset(data, m, d / "both", layers=[1], sites=["blocks.0.hook_mlp_out"],
                           progress=False)
    assert not (d / "both").exists()


def test_sites_with_token_selection_outliers_and_the_token_store(setup, tmp_path):
    """A per-token run of sites keeps only the selected tokens (`--tokens steps`,
    `--drop-bos`) with their keys, one norm per site and row, outlier marks per
    site, and the shuffled token store holds exactly its rows per site."""
    d, path, data, m = setup
    full = tmp_path / "full"
    rl.extract_dataset(data, m, full, sites=SITES, pooling="none", shard_size=3, progress=False)
    out = tmp_path / "sel"
    s = rl.extract_dataset(data, m, out, sites=SITES, pooling="none", shard_size=3, progress=False,
                           tokens="steps", drop_bos=True, outliers=1.5)
    assert s["items"] == 7
    whole, sel = rl.open_latents(full), rl.open_latents(out)
    total_marked = 0
    for i in range(len(sel)):
        pos = np.asarray(sel[i].token_key("token_positions"))
        in_steps = np.zeros(len(whole[i].token_steps), bool)
        for a, b in whole[i].token_spans:
            in_steps[a:b] = True
        np.testing.assert_array_equal(pos, np.flatnonzero(in_steps))
        ids = _ids_of(m, data, out, i)
        np.testing.assert_array_equal(sel[i].token_key("token_ids"), np.asarray(ids)[pos])
        norms = np.asarray(sel[i].token_key("token_norms"))
        assert norms.shape == (len(CANON), len(pos))
        for k, name in enumerate(CANON):
            rows = np.asarray(sel[i].site(name))
            np.testing.assert_array_equal(rows, np.asarray(whole[i].site(name))[pos])
            np.testing.assert_allclose(norms[k], np.linalg.norm(rows.astype(np.float64), axis=1),
                                       rtol=1e-6)
        total_marked += int(np.asarray(sel[i].token_key("token_outliers")).any(axis=0).sum())
    assert json.loads((out / "manifest.json").read_text())["totals"]["outliers"] == total_marked
    from rjepa_latent.store.token_store import open_tokens
    assert cli_main(["tokens", str(out), "--out", str(tmp_path / "tok"), "--seed", "3"]) == 0
    ts = open_tokens(tmp_path / "tok")
    for name in CANON:
        assert name in ts.sites
        got = np.concatenate([np.asarray(ts.chunk(name, c, raw=False), np.float32)
                              for c in range(ts.chunks)])
        want = np.concatenate([np.asarray(sel[i].site(name)) for i in range(len(sel))])
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.sort(got.view(np.uint32).sum(axis=1)),
                                      np.sort(want.view(np.uint32).sum(axis=1)))


def test_sites_of_a_model_kept_quantized(tmp_path):
    """Sites of a GGUF model whose matrices stay quantized equal those of the
    same file dequantized at load (bitwise: the second projection of
    hook_attn_out / hook_mlp_out reads the dequantized matrix too)."""
    path = tiny_model(tmp_path / "q", family="llama", layers=2, format="gguf", dtype="Q5_1")
    ids = list(range(3, 40))
    got = {}
    for mode in ("keep", "dequantize"):
        with rl.Model(path, device="cpu", weights=mode) as m:
            got[mode] = {k: np.array(v) for k, v in m.activations(ids, SITES).items()}
    for name in CANON:
        np.testing.assert_array_equal(got["keep"][name], got["dequantize"][name])

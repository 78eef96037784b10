"""Activation sites (rjepa_latent/engine/sites.py, csrc/sites.c): every site of
every block of a tiny random model of every family equals HF transformers
(CPU, fp32, eager) read by forward hooks on the corresponding modules, within
1e-5 (max|ours - HF| / max|HF| per site), for per-token output and every span
pooling; the residual identities hold; names resolve and bad ones are refused.

Run with -s to see the worst error per family."""
from __future__ import annotations

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.engine.sites import HOOKS, SITE_KINDS, canonical, parse_site, resolve_sites
from rjepa_latent.errors import LayerError, LayerTypeError
from rjepa_latent.testing import families, tiny_model

TOL = 1e-5
LAYERS = 3
LENGTHS = (1, 9, 45)   # 45 > the 32-token window of the tiny Gemma models
SPAN_POOLINGS = ["mean", "first", "last", "max"]


def all_sites(n_blocks: int) -> list[str]:
    return [f"blocks.{b}.{HOOKS[k]}" for b in range(n_blocks) for k in SITE_KINDS]


def ids_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(2, 300, n).astype(np.int32)


@pytest.fixture(scope="module", params=families())
def family(request, tmp_path_factory):
    import torch
    import transformers as T
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "m", family=request.param,
                      layers=LAYERS)
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    m = rl.Model(path, device="cpu")
    yield request.param, m, hf
    m.close()


def hf_sites(hf, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every site of every block, read by forward hooks on HF's modules: the
    decoder layer's input and output (resid_pre, resid_post), o_proj's input
    (attn_z) and output, down_proj's input (mlp_post) and output, and, in
    families with post-norms, the post-attention / post-feedforward norms'
    outputs (attn_out, mlp_out); resid_mid by its identity."""
    import torch
    got: dict[str, torch.Tensor] = {}
    handles = []

    def save(name, pre):
        def hook(mod, args, kwargs_or_out, *rest):
            if pre:
                t = args[0] if args else kwargs_or_out["hidden_states"]
            else:
                t = kwargs_or_out[0] if isinstance(kwargs_or_out, tuple) else kwargs_or_out
            got[name] = t[0].detach().to(torch.float64).clone()
        return hook

    for b, layer in enumerate(hf.model.layers):
        post_norms = hasattr(layer, "post_feedforward_layernorm")
        handles.append(layer.register_forward_pre_hook(save(f"blocks.{b}.hook_resid_pre", True),
                                                       with_kwargs=True))
        handles.append(layer.register_forward_hook(save(f"blocks.{b}.hook_resid_post", False)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            save(f"blocks.{b}.attn.hook_z", True), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            save(f"blocks.{b}.mlp.hook_post", True), with_kwargs=True))
        attn_mod = layer.post_attention_layernorm if post_norms else layer.self_attn.o_proj
        mlp_mod = layer.post_feedforward_layernorm if post_norms else layer.mlp.down_proj
        handles.append(attn_mod.register_forward_hook(save(f"blocks.{b}.hook_attn_out", False)))
        handles.append(mlp_mod.register_forward_hook(save(f"blocks.{b}.hook_mlp_out", False)))
    try:
        with torch.inference_mode():
            hf(torch.tensor(ids, dtype=torch.long)[None])
    finally:
        for h in handles:
            h.remove()
    out = {k: v.numpy() for k, v in got.items()}
    for b in range(len(hf.model.layers)):
        out[f"blocks.{b}.hook_resid_mid"] = (out[f"blocks.{b}.hook_resid_pre"]
                                             + out[f"blocks.{b}.hook_attn_out"])
    return out


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def pool(x: np.ndarray, spans: np.ndarray, how: str) -> np.ndarray:
    f = {"mean": lambda a: a.mean(0), "first": lambda a: a[0], "last": lambda a: a[-1],
         "max": lambda a: a.max(0)}[how]
    return np.stack([f(x[s:e]) for s, e in spans])


def test_every_site_matches_hf_hooks(family):
    name, m, hf = family
    sites = all_sites(LAYERS)
    worst = 0.0
    for n in LENGTHS:
        ids = ids_of(n)
        ref = hf_sites(hf, ids)
        ours = m.activations(ids, sites)
        assert list(ours) == sites
        for s in sites:
            assert ours[s].dtype == np.float32 and ours[s].shape == ref[s].shape, s
            err = rel(ours[s], ref[s])
            worst = max(worst, err)
            assert err <= TOL, f"{name} {s} T={n}: {err:.2e}"
    print(f"\n{name}: worst site error vs HF hooks {worst:.2e}")


def test_every_pooling_matches_hf_hooks(family):
    """Two packed sequences, steps that overlap and cover single tokens, all four
    span poolings from one forward, and pooling "none"."""
    name, m, hf = family
    sites = all_sites(LAYERS)
    seqs = [ids_of(45, 1), ids_of(9, 2)]
    spans = [np.array([[0, 45], [0, 1], [3, 20], [10, 11], [40, 45]]), np.array([[0, 9], [8, 9]])]
    pooled = m.extract(seqs, spans, pooling=SPAN_POOLINGS, sites=sites)
    tokens = m.extract(seqs, pooling="none", sites=sites)
    for k, ids in enumerate(seqs):
        ref = hf_sites(hf, ids)
        for s in sites:
            assert pooled[k][s].shape == (4, len(spans[k]), ref[s].shape[1])
            for q, how in enumerate(SPAN_POOLINGS):
                err = rel(pooled[k][s][q], pool(ref[s], spans[k], how))
                assert err <= TOL, f"{name} {s} {how} seq {k}: {err:.2e}"
            assert rel(tokens[k][s], ref[s]) <= TOL, f"{name} {s} none seq {k}"


def test_identities_and_hidden_states(family):
    """resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out (to float32
    rounding of the sum), resid_pre of block b is hidden state b bitwise, and the
    last block's resid_post is raw: HF's last hidden state is its final norm."""
    name, m, hf = family
    ids = ids_of(45)
    a = m.activations(ids, all_sites(LAYERS))
    hs = m.hidden_states(ids)
    for b in range(LAYERS):
        g = lambda k: a[f"blocks.{b}.{HOOKS[k]}"].astype(np.float64)  # noqa: E731
        scale = np.abs(g("resid_post")).max()
        assert np.abs(g("resid_mid") - g("resid_pre") - g("attn_out")).max() <= 1e-6 * scale
        assert np.abs(g("resid_post") - g("resid_mid") - g("mlp_out")).max() <= 1e-6 * scale
        np.testing.assert_array_equal(a[f"blocks.{b}.hook_resid_pre"], hs[b])
        if b + 1 < LAYERS:
            np.testing.assert_array_equal(a[f"blocks.{b}.hook_resid_post"], hs[b + 1])
    last = a[f"blocks.{LAYERS - 1}.hook_resid_post"]
    assert rel(last, hf_sites(hf, ids)[f"blocks.{LAYERS - 1}.hook_resid_post"]) <= TOL
    assert np.abs(last - hs[LAYERS]).max() > 1e-3   # not the final-normed state


def test_asking_fewer_sites_changes_nothing(family):
    """A site alone (the forward then stops at its half block), or with others,
    or in another order, gives the same bits; negative blocks name the same site."""
    name, m, hf = family
    ids = ids_of(45)
    full = m.activations(ids, all_sites(LAYERS))
    for s in ("blocks.0.attn.hook_z", "blocks.-1.hook_resid_mid", "blocks.1.mlp.hook_post",
              "blocks.-1.hook_resid_post", "blocks.0.hook_resid_pre"):
        one = m.activations(ids, [s])
        (key, v), = one.items()
        assert key == canonical(s, LAYERS)
        np.testing.assert_array_equal(v, full[key])
    two = m.activations(ids, ["blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"])
    np.testing.assert_array_equal(two["blocks.2.hook_mlp_out"], full["blocks.2.hook_mlp_out"])
    np.testing.assert_array_equal(two["blocks.0.hook_attn_out"], full["blocks.0.hook_attn_out"])


def test_ring_of_pooled_rows(tmp_path):
    """A result larger than the workspace's pooled rows goes through them as a
    ring: the same bits as a result pooled in place."""
    path = tiny_model(tmp_path / "m", family="qwen3", layers=2)
    ids = ids_of(45)
    sites = all_sites(2)
    with rl.Model(path, device="cpu") as big, rl.Model(path, device="cpu", max_batch_tokens=2) as small:
        ref = big.activations(ids, sites)
        # workspace grown to 45 tokens for the call: 2 x 45 pooled rows of 64 floats,
        # less than the 2 poolings x 45 spans x 1024 floats of the result
        got = small.extract([ids, ids[:7]], [np.array([[i, i + 1] for i in range(45)]),
                                             np.array([[0, 7]])],
                            pooling=["first", "mean"], sites=sites, max_batch_tokens=2)
        for s in sites:
            np.testing.assert_array_equal(got[0][s][0], ref[s])
            np.testing.assert_allclose(got[1][s][1][0], ref_short(big, ids[:7], s), rtol=0,
                                       atol=1e-6 * max(1.0, float(np.abs(ref[s]).max())))


def ref_short(m, ids, site):
    return m.activations(ids, [site])[canonical(site, m.num_layers)].mean(0)


def test_names():
    assert parse_site("blocks.-1.hook_resid_post", 4).name == "blocks.3.hook_resid_post"
    assert parse_site("blocks.0.attn.hook_z", 4).kind == "attn_z"
    assert parse_site("blocks.2.mlp.hook_post", 4).code == -1 - (2 * 7 + 4)
    for bad in ("blocks.0.hook_resid", "blocks.x.hook_resid_pre", "resid_pre", "blocks.0",
                "blocks.0.mlp.hook_pre", "hook_resid_post"):
        with pytest.raises(LayerError, match="blocks.{b}.hook_resid_pre"):
            parse_site(bad, 4)
    with pytest.raises(LayerError, match=r"block 4 is out of range.*0..3 or -4..-1"):
        parse_site("blocks.4.hook_resid_pre", 4)
    with pytest.raises(LayerError, match="block -5"):
        parse_site("blocks.-5.hook_attn_out", 4)
    with pytest.raises(LayerTypeError):
        parse_site(3, 4)
    with pytest.raises(LayerError, match="more than once"):
        resolve_sites(["blocks.3.hook_mlp_out", "blocks.-1.hook_mlp_out"], 4)
    with pytest.raises(LayerError, match="empty"):
        resolve_sites([], 4)
    with pytest.raises(LayerError, match="max_layer=2"):
        resolve_sites(["blocks.2.hook_attn_out"], 4, max_layer=2)
    assert resolve_sites(["blocks.2.hook_resid_pre"], 4, max_layer=2)[0].block == 2


def test_model_refuses_bad_sites(tmp_path):
    path = tiny_model(tmp_path / "m", family="llama", layers=2)
    with rl.Model(path, device="cpu", max_layer=1) as m:
        with pytest.raises(LayerError, match="max_layer=1"):
            m.activations([1, 2, 3], ["blocks.1.hook_resid_mid"])
        assert m.activations([1, 2, 3], "blocks.1.hook_resid_pre")["blocks.1.hook_resid_pre"].shape \
            == (3, 64)
        with pytest.raises(LayerError, match="unknown site"):
            m.extract([[1, 2, 3]], sites=["blocks.0.resid_post"])
        # the C core validates again: a code of a block the model does not run
        eng = m._eng()
        code = np.array([-1 - (1 * 7 + 6)], np.int32)
        with pytest.raises(ValueError, match="site resid_post of block 1.*runs blocks 0..0"):
            eng.forward(np.array([1, 2], np.int32), np.array([0, 2], np.int32), code,
                        np.array([[0, 2]], np.int32), np.array([0], np.int32), "mean")

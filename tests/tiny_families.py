"""Helpers of the per-family parity tests (tests/test_arch_<family>.py): tiny
random HF checkpoints built from a transformers config, HF's fp32 eager
hidden states, the per-layer error of the contract, and the two checks every
family passes (every layer vs HF; packing bitwise neutral).

Error measure (docs/models.md): per hidden-state layer
max |ours - HF| / max |HF|, the worst over layers and lengths; bound 1e-5.
Texts run longer than the sliding window (8 in these tests), and
`window_matters` shows the window changes HF's own states at those lengths,
so a model that ignored it would fail.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from conftest import make_tokenizer

TOL = 1e-5
LENGTHS = (1, 7, 8, 9, 45, 130)
VOCAB = 320


def build(cfg, out: pathlib.Path, seed: int = 1, norm_mean: float = 1.0) -> pathlib.Path:
    """A tiny model of `cfg` (a transformers config), weights ~ N(0, 0.2),
    norm weights norm_mean + N(0, 0.2), saved as safetensors with a tokenizer."""
    import torch
    import transformers as T
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(norm_mean + noise if "norm" in name else noise)
    model.save_pretrained(out)
    make_tokenizer(out / "tokenizer.json")
    return out


_MODELS: dict[str, object] = {}


def hf_model(directory):
    import torch
    import transformers as T
    key = os.fspath(directory)
    if key not in _MODELS:
        _MODELS[key] = T.AutoModelForCausalLM.from_pretrained(
            key, dtype=torch.float32, attn_implementation="eager").eval()
    return _MODELS[key]


def hf_states(directory, ids, model=None) -> np.ndarray:
    """HF fp32 eager `output_hidden_states` of one sequence: [L+1, T, hidden]."""
    import torch
    model = model or hf_model(directory)
    with torch.inference_mode():
        out = model.model(torch.as_tensor(np.asarray(ids, np.int64))[None],
                          output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float().numpy()


def max_rel(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per layer (axis 0): max |ours - ref| / max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours - ref).reshape(len(ref), -1).max(1)
    return diff / np.abs(ref).reshape(len(ref), -1).max(1)


def ids_of(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, length).astype(np.int64)


def every_layer_matches_hf(m, directory, lengths=LENGTHS) -> float:
    """Asserts every hidden state of `m` (an rl.Model) within TOL of HF at
    each length; returns the worst error."""
    worst = 0.0
    for n in lengths:
        ids = ids_of(n, seed=n)
        ours = m.hidden_states(ids)
        ref = hf_states(directory, ids)
        assert np.abs(ref[1:]).mean() > 0.1   # real activations
        err = max_rel(ours, ref)
        assert err.max() <= TOL, f"T={n}: error per layer {err}"
        worst = max(worst, float(err.max()))
    return worst


def packing_is_neutral(m, lengths=(5, 33, 1, 70, 12, 130)) -> None:
    """A packed batch gives, sequence for sequence, the bits of each alone."""
    seqs = [ids_of(n, seed=100 + n) for n in lengths]
    packed = m.extract(seqs, None, layers=range(m.num_layers + 1), pooling="none",
                       max_batch_tokens=4096)
    for s, p in zip(seqs, packed):
        np.testing.assert_array_equal(p, m.hidden_states(s))


def window_matters(directory, length: int = 45) -> float:
    """How much HF's own last hidden state changes when the window is lifted
    (the model's config.sliding_window set beyond the text): > 0 shows the
    texts of these tests are long enough to test the window."""
    model = hf_model(directory)
    ids = ids_of(length, seed=7)
    windowed = hf_states(directory, ids, model)
    saved = model.config.sliding_window
    model.config.sliding_window = 10 ** 6
    try:
        full = hf_states(directory, ids, model)
    finally:
        model.config.sliding_window = saved
    return float(max_rel(full, windowed).max())

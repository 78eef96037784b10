"""Whole-model parity of the CUDA engine with HF transformers on the GPU, and
the device contract (marked `gpu`; skipped cleanly without a CUDA device).

On the emulated device of a RJEPA_CUDA=emu test build (the same kernels and
backend run on the CPU) the same tests run with HF on the CPU as the reference
(fp32 eager; HF's own bf16 run on the CPU sets the bf16 bound) and on shorter
texts, still crossing the 64-row attention tiles (63, 64, 65, 129 tokens).

Parity rule (docs/design.md): for every hidden-state index, the relative error
||ours - ref|| / ||ref|| of our bf16 engine to an fp32 reference (HF in fp32,
eager attention, TF32 off, on the same GPU) must not exceed SLACK times HF's
own bf16 run's error to the same reference (sdpa, as users run it). SLACK =
1.1 absorbs run-to-run noise between two bf16 computations of similar
quality; our engine keeps the residual stream in f32 and rounds less than
HF's bf16 path, so it is expected below 1.0x.

fp32 criterion: our CUDA engine in its fp32 mode (dtype="float32":
f32 storage, f32 GEMMs without TF32) is within 1e-4 relative error of the same
HF fp32 reference on every layer; our CPU engine (fp32) is held to the same
bound, which also validates the reference itself. The HF fp32 reference is
computed once per architecture (on fresh random sequences) and shared by the
bf16 and fp32 tests.

Models: the tiny fixtures of conftest.py (head_dim 16 / 32) plus larger
head_dim 64 / 128 variants built here (GQA 4:1 and 2:1, Qwen2 biases, Qwen3
q/k norm), with sequence lengths around the 64-query attention tile.
"""
from __future__ import annotations

import functools
import gc
import pathlib
from typing import Callable

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SLACK = 1.1
FP32_REL = 1e-4
CONFTEST_ARCHS = ("llama", "llama3_rope", "llama_bias", "mistral", "qwen2", "qwen3", "llama_bf16")
WIDE_ARCHS = ("qwen3_hd128", "qwen2_hd128", "llama_hd64")


def emulated() -> bool:
    """The build's CUDA device is emulated on the CPU (RJEPA_CUDA=emu)."""
    import rjepa_latent as rl
    return str(rl.build_info().get("cuda_arch", "")).startswith("emulated")


EMULATED = emulated()
REF_DEVICE = "cpu" if EMULATED else "cuda"   # where HF's reference runs


def _require_gpu():
    """torch, once a CUDA device (real, or the emulated one) is there to test;
    on a real device also torch's CUDA, for the reference on the same GPU."""
    import rjepa_latent as rl
    from rjepa_latent import _core
    if not rl.build_info()["cuda"]:
        pytest.skip("CUDA not compiled in")
    if _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    torch = pytest.importorskip("torch")
    if EMULATED:
        return torch
    if not torch.cuda.is_available():
        # so also on the emulated device (RJEPA_CUDA=emu): these references run on torch's GPU
        pytest.skip("torch has no CUDA (the HF references of these tests run on torch's GPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def sizes(gpu, emulated_device):
    """`gpu` on a real device, the shorter `emulated_device` on the emulated one."""
    return emulated_device if EMULATED else gpu


def set_attention(monkeypatch, attn: str) -> None:
    """The attention kernel of the next CUDA Model: "mma" (default) or "fma"."""
    if attn == "fma":
        monkeypatch.setenv("RJEPA_ATTN", "fma")   # read when the CUDA backend is created
    else:
        monkeypatch.delenv("RJEPA_ATTN", raising=False)


def _wide_config(arch: str):
    import transformers as T
    common = dict(vocab_size=320, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  num_hidden_layers=3)
    if arch == "qwen3_hd128":
        return T.Qwen3Config(**common, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                             use_sliding_window=False)
    if arch == "qwen2_hd128":
        return T.Qwen2Config(**common, hidden_size=512, intermediate_size=768,
                             num_attention_heads=4, num_key_value_heads=2,
                             use_sliding_window=False)
    if arch == "llama_hd64":
        return T.LlamaConfig(**common, hidden_size=512, intermediate_size=1024,
                             num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0)
    raise KeyError(arch)


def _build_wide(arch: str, out: pathlib.Path) -> pathlib.Path:
    import torch
    import transformers as T
    model = T.AutoModelForCausalLM.from_config(_wide_config(arch), dtype=torch.float32)
    g = torch.Generator().manual_seed(WIDE_ARCHS.index(arch) + 11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    model.save_pretrained(out, max_shard_size="2MB")
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Callable[[str], pathlib.Path]:
    root = tmp_path_factory.mktemp("gpu_models")

    @functools.lru_cache(maxsize=None)
    def get(arch: str) -> pathlib.Path:
        if arch in WIDE_ARCHS:
            return _build_wide(arch, root / arch)
        return tiny_model_dir(arch)
    return get


def _hf_states(torch, directory: pathlib.Path, seqs: list[np.ndarray], bf16: bool,
               attn: str | None = None) -> list:
    """HF's hidden states on the GPU (the CPU for the emulated device) in fp32
    or bf16; attention `attn` (default: sdpa in bf16, eager in fp32)."""
    import transformers as T
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = T.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype,
        attn_implementation=attn or ("sdpa" if bf16 else "eager")).to(REF_DEVICE).eval()
    out = []
    with torch.inference_mode():
        for ids in seqs:
            hs = model.model(torch.as_tensor(ids, dtype=torch.long, device=REF_DEVICE)[None],
                             output_hidden_states=True).hidden_states
            out.append(torch.stack(hs)[:, 0].float().cpu().numpy())
    del model
    if REF_DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def _rel_per_layer(got: list[np.ndarray], ref: list[np.ndarray]) -> np.ndarray:
    """||got - ref|| / ||ref|| per hidden index, over all sequences together."""
    num = sum(((g.astype(np.float64) - r) ** 2).sum(axis=(1, 2)) for g, r in zip(got, ref))
    den = sum((r.astype(np.float64) ** 2).sum(axis=(1, 2)) for r in ref)
    return np.sqrt(num / den)


def _seqs(rng: np.random.Generator, lens: list[int], vocab: int = 320) -> list[np.ndarray]:
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lens]


LENS = sizes([1, 17, 63, 64, 65, 150, 300], [1, 17, 63, 64, 65, 129])
WIDE_EXTRA = sizes([700], [])   # one long text for the wide models


@pytest.fixture(scope="module")
def hf_reference(model_dir) -> Callable[[str], tuple]:
    """arch -> (directory, seqs, HF fp32 eager states on the GPU), once per arch."""
    @functools.lru_cache(maxsize=None)
    def get(arch: str) -> tuple:
        torch = _require_gpu()
        d = model_dir(arch)
        seqs = _seqs(np.random.default_rng(), LENS + (WIDE_EXTRA if arch in WIDE_ARCHS else []))
        return d, seqs, _hf_states(torch, d, seqs, bf16=False)
    return get


@pytest.fixture(scope="module")
def hf_bf16(hf_reference) -> Callable[[str], list]:
    """arch -> HF's own bf16 states (sdpa) on hf_reference's texts, once per arch."""
    @functools.lru_cache(maxsize=None)
    def get(arch: str) -> list:
        d, seqs, _ = hf_reference(arch)
        return _hf_states(_require_gpu(), d, seqs, bf16=True)
    return get


def _fp32_table(columns: dict[str, np.ndarray]) -> str:
    """Rows "  L<k>: name err ..." (not "layer <k>:", which gpu_check.sh's
    bf16 summary collects)."""
    names = list(columns)
    rows = [f"  L{k}: " + "  ".join(f"{n} {columns[n][k]:.3e}" for n in names)
            for k in range(len(columns[names[0]]))]
    return "\n".join(rows)


@pytest.mark.parametrize("attn", ["mma", "fma"])
@pytest.mark.parametrize("arch", CONFTEST_ARCHS + WIDE_ARCHS)
def test_parity_with_hf_bf16(hf_reference, hf_bf16, arch, attn, monkeypatch):
    _require_gpu()
    import rjepa_latent as rl
    d, seqs, ref = hf_reference(arch)
    hf16 = hf_bf16(arch)
    set_attention(monkeypatch, attn)
    gpu = rl.Model(d, device="cuda:0")
    assert gpu.kernel.endswith(f"attention {attn}"), gpu.kernel
    ours = [gpu.hidden_states(s) for s in seqs]
    gpu.close()
    assert all(np.isfinite(o).all() for o in ours), "non-finite hidden states"
    e_ours, e_hf = _rel_per_layer(ours, ref), _rel_per_layer(hf16, ref)
    table = "\n".join(f"  layer {k}: ours {a:.3e}  hf-bf16 {b:.3e}"
                      for k, (a, b) in enumerate(zip(e_ours, e_hf)))
    # gpu_check.sh's summary: the deepest layer per model, from a line that
    # starts with the name (pytest -s puts its progress dot before a print)
    print(f"\n{arch}-{attn}\n{table}")
    assert (e_ours <= SLACK * e_hf + 1e-7).all(), f"{arch}: bf16 error above HF's:\n{table}"


@pytest.mark.parametrize("arch", CONFTEST_ARCHS + WIDE_ARCHS)
def test_parity_with_hf_fp32(hf_reference, arch):
    """Our CUDA fp32 mode and our CPU engine vs HF fp32 (TF32 off) on the GPU:
    <= FP32_REL relative error on every layer."""
    _require_gpu()
    import rjepa_latent as rl
    d, seqs, ref = hf_reference(arch)
    gpu = rl.Model(d, device="cuda:0", dtype="float32")
    assert gpu.dtype == "float32"
    ours = [gpu.hidden_states(s) for s in seqs]
    gpu.close()
    assert all(np.isfinite(o).all() for o in ours), "non-finite hidden states"
    e_gpu = _rel_per_layer(ours, ref)
    cpu = rl.Model(d, device="cpu")
    e_cpu = _rel_per_layer([cpu.hidden_states(s) for s in seqs], ref)
    table = _fp32_table({"cuda-fp32": e_gpu, "cpu-fp32": e_cpu})
    # "fp32 <arch>": a line gpu_check.sh's summary picks up (worst layer)
    print(f"\nfp32 {arch}: worst layer cuda {e_gpu.max():.3e} cpu {e_cpu.max():.3e}\n{table}")
    assert (e_gpu <= FP32_REL).all(), f"{arch}: CUDA fp32 vs HF fp32 on GPU:\n{table}"
    assert (e_cpu <= FP32_REL).all(), f"{arch}: CPU fp32 vs HF fp32 on GPU:\n{table}"


@pytest.mark.parametrize("arch", sizes(("qwen3", "qwen3_hd128", "llama_hd64"), ("qwen3", "qwen3_hd128")))
def test_pooling_on_device_matches_token_states(model_dir, arch):
    _require_gpu()
    import rjepa_latent as rl
    rng = np.random.default_rng()
    m = rl.Model(model_dir(arch), device="cuda:0")
    seqs = _seqs(rng, sizes([5, 90, 200], [5, 65, 129]))
    spans = [np.array([[0, 1], [0, len(s)], [len(s) // 3, len(s) - 1 if len(s) > 2 else len(s)]],
                      np.int32) for s in seqs]
    layers = [0, 1, -2, -1]
    tok = m.extract(seqs, None, layers, "none")
    poolings = ("mean", "max", "first", "last")
    singles = {}
    for pooling in poolings:
        pooled = singles[pooling] = m.extract(seqs, spans, layers, pooling)
        for t, p, sp in zip(tok, pooled, spans):
            for j, (a, b) in enumerate(sp):
                if pooling == "mean":
                    want = t[:, a:b].astype(np.float64).mean(1)
                    np.testing.assert_allclose(p[:, j], want, rtol=1e-4, atol=1e-5)
                elif pooling == "max":
                    np.testing.assert_array_equal(p[:, j], t[:, a:b].max(1))
                else:
                    np.testing.assert_array_equal(p[:, j], t[:, a if pooling == "first" else b - 1])
    # all of them from one forward: each the same as alone
    together = m.extract(seqs, spans, layers, list(poolings))
    for k, pooling in enumerate(poolings):
        for both, alone in zip(together, singles[pooling]):
            np.testing.assert_array_equal(both[k], alone)
    m.close()


@pytest.mark.parametrize("arch", ("llama", "qwen3_hd128"))
def test_packed_equals_alone(model_dir, arch):
    torch = _require_gpu()
    import rjepa_latent as rl
    rng = np.random.default_rng()
    d = model_dir(arch)
    seqs = _seqs(rng, sizes([3, 64, 129, 40, 1, 250], [3, 64, 129, 40, 1]))
    m = rl.Model(d, device="cuda:0")
    packed = m.extract(seqs, None, list(range(m.num_layers + 1)), "none")
    alone = [m.extract([s], None, list(range(m.num_layers + 1)), "none")[0] for s in seqs]
    # the noise of one bf16 run: our error to the fp32 reference
    e_ours = _rel_per_layer(alone, _hf_states(torch, d, seqs, bf16=False))
    e_pack = _rel_per_layer(packed, alone)
    assert (e_pack <= 2 * e_ours + 1e-6).all(), f"packed vs alone {e_pack}, bf16 noise {e_ours}"


def test_device_contract(model_dir):
    _require_gpu()
    import rjepa_latent as rl
    from rjepa_latent import _core
    d = model_dir("qwen3_hd128")
    m = rl.Model(d, device="cuda:0", max_batch_tokens=4096)
    rep = m.memory_report()
    plan = rl.memory_plan(d, "cuda:0", max_batch_tokens=4096)
    assert rep["device"] == "cuda:0"
    assert rep["weight_bytes"] == plan["weight_bytes"] > 0
    assert rep["workspace_bytes"] == plan["workspace_bytes"] > 0
    assert 0 < rep["free_bytes"] <= rep["total_bytes"]
    assert plan["free_bytes"] > 0 and plan["total_device_bytes"] >= plan["free_bytes"]
    m._engine.verify_resident()
    m.close()
    # the fp32 mode: its own plan (f32 weights), still all on the device
    m32 = rl.Model(d, device="cuda:0", max_batch_tokens=4096, dtype="float32")
    plan32 = rl.memory_plan(d, "cuda:0", max_batch_tokens=4096, dtype="float32")
    rep32 = m32.memory_report()
    assert (rep32["weight_bytes"], rep32["workspace_bytes"]) == \
        (plan32["weight_bytes"], plan32["workspace_bytes"])
    assert plan32["weight_bytes"] > 1.9 * plan["weight_bytes"]
    m32._engine.verify_resident()
    m32.close()
    del m, m32
    gc.collect()  # engines of earlier tests must not be freed during the measurement

    free_before = _core.cuda_mem_info(0)[0]
    huge = 1 << 29
    with pytest.raises(rl.DeviceMemoryError, match="max_batch_tokens"):
        rl.Model(d, device="cuda:0", max_batch_tokens=huge)
    assert rl.memory_plan(d, "cuda:0", max_batch_tokens=huge)["total_bytes"] > free_before
    # nothing was allocated for the refused model
    assert abs(_core.cuda_mem_info(0)[0] - free_before) < (64 << 20)

    n = _core.cuda_device_count()
    with pytest.raises(rl.DeviceError, match="out of range"):
        rl.Model(d, device=f"cuda:{n}")


def test_results_survive_model_close(model_dir):
    """Returned arrays stay valid and unchanged after the model is closed: a
    result owns its own allocation, not the model's."""
    _require_gpu()
    import rjepa_latent as rl
    rng = np.random.default_rng()
    m = rl.Model(model_dir("llama"), device="cuda:0")
    seqs = _seqs(rng, [30, 12])
    a = m.extract(seqs, None, [-2], "mean")
    keep = [x.copy() for x in a]
    m.close()
    del m
    for x, k in zip(a, keep):
        np.testing.assert_array_equal(x, k)

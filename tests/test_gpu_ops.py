"""Every CUDA backend op against the CPU backend's op (marked `gpu`).

The ops are called directly through the engine's C op table with ctypes
(the extension exports rl_backend_cuda_create / rl_backend_cpu_create and
the rl_backend struct layout is the one of csrc/engine.h), so no test-only
entry point is needed in the binding. For each op:
- inputs are fresh random values (seed printed on failure), rounded to bf16
  first so both backends see identical values;
- outputs are poisoned with NaN on both backends before the run, so an
  unwritten element fails (NaN never passes);
- the CUDA result (bf16 storage, f32 math) must equal the CPU result (f32)
  within bf16 rounding of the output (f32 outputs: within f32 summation-order
  differences).
The mode-dependent ops run for both CUDA storage dtypes (the `devs` fixture
is parametrized): bf16 (the default backend) and f32 (the fp32 reference
mode, rl_backend_cuda_create_ex(.., RL_F32, ..)), where every output must
match the CPU within F32_REL: tight enough that a TF32 GEMM or a bf16
rounding anywhere fails.
Skips cleanly when CUDA is not compiled in or no device is visible.
"""
from __future__ import annotations

import ctypes as C
from typing import Iterator

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

RL_F32, RL_BF16, RL_F16 = 0, 1, 2
POOL_MEAN, POOL_FIRST, POOL_LAST = 0, 1, 2
BF16_EPS = 2.0 ** -8  # one rounding of a bf16 output, relative
# fp32 mode: relative to |ref| + F32_FLOOR * rms(ref) (f32 summation order,
# sincosf/expf ulps); TF32 (2^-11 per product) or bf16 (2^-9) are far above
F32_REL, F32_FLOOR = 1e-4, 0.5

VP, ST, I64 = C.c_void_p, C.c_int, C.c_int64
FN = C.CFUNCTYPE


class Segments(C.Structure):
    _fields_ = [("cu_seqlens_host", VP), ("cu_seqlens_dev", VP), ("positions_dev", VP),
                ("n_seqs", I64), ("max_seqlen", I64)]


SEG = C.POINTER(Segments)


class Backend(C.Structure):
    """Mirror of struct rl_backend in csrc/engine.h (same field order)."""
    _fields_ = [
        ("name", C.c_char_p), ("weight_dtype", C.c_int), ("act_dtype", C.c_int),
        ("res_dtype", C.c_int), ("impl", VP),
        ("alloc", FN(ST, VP, C.POINTER(VP), C.c_size_t)),
        ("free", FN(None, VP, VP)),
        ("host_alloc", FN(ST, VP, C.POINTER(VP), C.c_size_t)),
        ("host_free", FN(None, VP, VP)),
        ("upload", FN(ST, VP, VP, C.c_int, C.c_size_t, VP, C.c_int, C.c_size_t)),
        ("upload_i32", FN(ST, VP, VP, VP, C.c_size_t)),
        ("download_f32", FN(ST, VP, VP, VP, C.c_size_t)),
        ("sync", FN(ST, VP)),
        ("mem_info", FN(ST, VP, C.POINTER(C.c_size_t), C.POINTER(C.c_size_t))),
        ("is_resident", FN(C.c_int, VP, VP)),
        ("embed", FN(ST, VP, VP, I64, VP, I64, VP)),
        ("rmsnorm", FN(ST, VP, VP, VP, VP, C.c_int, I64, I64, C.c_float)),
        ("gemm", FN(ST, VP, SEG, VP, VP, VP, VP, I64, I64, I64, C.c_int)),
        ("qk_norm_rope", FN(ST, VP, SEG, VP, I64, I64, I64, I64, VP, VP, C.c_float, VP)),
        ("attention", FN(ST, VP, SEG, VP, VP, I64, I64, I64, I64, C.c_float)),
        ("swiglu", FN(ST, VP, VP, VP, I64, I64)),
        ("pool", FN(ST, VP, VP, C.c_int, I64, VP, I64, C.c_int, VP)),
        ("destroy", FN(None, VP)),
    ]


def _lib():
    from rjepa_latent import _native  # noqa: F401  (loads OpenBLAS first)
    from rjepa_latent import _core
    if not _core.build_info()["cuda"]:
        pytest.skip("CUDA not compiled in")
    if _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    lib = C.CDLL(_core.__file__)
    for sym in ("rl_backend_cuda_create", "rl_backend_cuda_create_ex", "rl_backend_cpu_create",
                "rl_last_error"):
        if not hasattr(lib, sym):
            pytest.skip(f"{sym} is not exported by _core")
    lib.rl_last_error.restype = C.c_char_p
    lib.rl_backend_cuda_create.argtypes = [C.c_int, C.POINTER(C.POINTER(Backend))]
    lib.rl_backend_cuda_create_ex.argtypes = [C.c_int, C.c_int, C.POINTER(C.POINTER(Backend))]
    lib.rl_backend_cpu_create.argtypes = [C.c_int, C.POINTER(C.POINTER(Backend))]
    return lib


# ---- bf16 on the host -------------------------------------------------------

def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round f32 to the nearest bf16 (ties to even), returned as f32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return r.view(np.float32)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


class Dev:
    """One backend (CUDA or CPU) with helpers to move f32 arrays in and out."""

    def __init__(self, lib, kind: str, dtype: int = RL_BF16) -> None:
        """kind "cuda" (storage `dtype`: RL_BF16 default, RL_F32) or "cpu"."""
        self.lib = lib
        ptr = C.POINTER(Backend)()
        if kind == "cpu":
            st = lib.rl_backend_cpu_create(2, C.byref(ptr))
        elif dtype == RL_BF16:  # the plain constructor: the default mode
            st = lib.rl_backend_cuda_create(0, C.byref(ptr))
        else:
            st = lib.rl_backend_cuda_create_ex(0, dtype, C.byref(ptr))
        assert st == 0, lib.rl_last_error().decode()
        self.b = ptr.contents
        self.bp = C.cast(ptr, VP)
        self.kind = kind
        self.dtype = dtype if kind == "cuda" else RL_F32
        self.bufs: list[int] = []

    def check(self, st: int) -> None:
        assert st == 0, f"{self.kind}: status {st}: {self.lib.rl_last_error().decode()}"

    def alloc(self, nbytes: int) -> int:
        p = VP()
        self.check(self.b.alloc(self.bp, C.byref(p), nbytes + 16))  # +16: room to read bf16 as f32
        self.bufs.append(p.value)
        return p.value

    def put(self, x: np.ndarray, dtype: int) -> int:
        """New buffer holding x (f32 values) converted to `dtype`."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        p = self.alloc(x.size * (4 if dtype == RL_F32 else 2))
        self.upload(p, x, dtype)
        return p

    def upload(self, p: int, x: np.ndarray, dtype: int, offset: int = 0,
               src_dtype: int = RL_F32) -> None:
        self.check(self.b.upload(self.bp, p, dtype, offset, x.ctypes.data, src_dtype, x.size))

    def put_i32(self, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, dtype=np.int32)
        p = self.alloc(x.size * 4)
        self.check(self.b.upload_i32(self.bp, p, x.ctypes.data, x.size))
        return p

    def empty(self, n: int, dtype: int) -> int:
        """New buffer of n elements, poisoned with NaN."""
        p = self.alloc(n * (4 if dtype == RL_F32 else 2))
        self.upload(p, np.full(n, np.nan, np.float32), dtype)
        return p

    def get(self, p: int, n: int, dtype: int) -> np.ndarray:
        """n elements of a buffer as f32 (bf16 read as raw words, then widened)."""
        if dtype == RL_F32:
            out = np.empty(n, np.float32)
            self.check(self.b.download_f32(self.bp, out.ctypes.data, p, n))
            return out
        words = np.empty((n + 1) // 2, np.float32)
        self.check(self.b.download_f32(self.bp, words.ctypes.data, p, words.size))
        return bf16_bits_to_f32(words.view(np.uint16)[:n])

    def segments(self, lens: list[int]) -> tuple[Segments, np.ndarray]:
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
        seg = Segments(cu.ctypes.data, self.put_i32(cu), self.put_i32(pos), len(lens), max(lens))
        return seg, cu  # cu must stay alive while seg is used

    def close(self) -> None:
        for p in self.bufs:
            self.b.free(self.bp, p)
        self.b.destroy(self.bp)


def _pair(monkeypatch, dtype: int) -> Iterator[tuple[Dev, Dev]]:
    lib = _lib()
    monkeypatch.delenv("RJEPA_ATTN", raising=False)  # the default kernels
    gpu, cpu = Dev(lib, "cuda", dtype), Dev(lib, "cpu")
    yield gpu, cpu
    gpu.close()
    cpu.close()


@pytest.fixture(params=[RL_BF16, RL_F32], ids=["bf16", "f32"])
def devs(request, monkeypatch) -> Iterator[tuple[Dev, Dev]]:
    """(CUDA backend in each storage mode, CPU backend)."""
    yield from _pair(monkeypatch, request.param)


@pytest.fixture
def devs_bf16(monkeypatch) -> Iterator[tuple[Dev, Dev]]:
    """For the tests that do not depend on the mode: the default backend only."""
    yield from _pair(monkeypatch, RL_BF16)


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def assert_close(got: np.ndarray, ref: np.ndarray, rel: float, what: str,
                 floor: float = 2.0 ** -6) -> None:
    """Elementwise |got - ref| <= rel * (|ref| + floor * rms(ref)), no NaN."""
    assert got.shape == ref.shape
    bad = np.count_nonzero(~np.isfinite(got))
    assert bad == 0, f"{what}: {bad} non-finite values"
    scale = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))) or 1.0
    err = np.abs(got.astype(np.float64) - ref)
    bound = rel * (np.abs(ref) + floor * scale)
    off = err > bound
    assert not off.any(), (f"{what}: {off.sum()} of {off.size} elements off, worst "
                           f"{err.max():.3g} (ref rms {scale:.3g})")


def assert_out(gpu: Dev, got: np.ndarray, ref: np.ndarray, bf16_rel: float, what: str,
               floor: float = 2.0 ** -6) -> None:
    """assert_close with the bound of the GPU's mode: `bf16_rel` (and `floor`)
    for bf16 outputs, F32_REL / F32_FLOOR in the fp32 mode."""
    if gpu.b.act_dtype == RL_F32:
        assert_close(got, ref, F32_REL, f"{what} [f32 mode]", floor=F32_FLOOR)
    else:
        assert_close(got, ref, bf16_rel, what, floor=floor)


# ---- ops ----------------------------------------------------------------------

def test_storage_dtypes(devs):
    gpu, _ = devs
    want = RL_F32 if gpu.dtype == RL_F32 else RL_BF16
    assert (gpu.b.weight_dtype, gpu.b.act_dtype, gpu.b.res_dtype) == (want, want, RL_F32)


def test_create_ex_refuses_other_dtypes():
    lib = _lib()
    ptr = C.POINTER(Backend)()
    assert lib.rl_backend_cuda_create_ex(0, RL_F16, C.byref(ptr)) == 1  # RL_ERR_INVALID
    assert not ptr and b"bf16 or f32" in lib.rl_last_error()


@pytest.mark.parametrize("d", [64, 100, 4096])
def test_embed(devs, rng, d):
    gpu, cpu = devs
    V, T = 1000, 77
    table = bf16_round(rng.standard_normal((V, d)).astype(np.float32))
    tokens = rng.integers(0, V, T).astype(np.int32)
    outs = []
    for dev in (gpu, cpu):
        tp, tb = dev.put_i32(tokens), dev.put(table, dev.b.weight_dtype)
        x = dev.empty(T * d, RL_F32)
        dev.check(dev.b.embed(dev.bp, tp, T, tb, d, x))
        outs.append(dev.get(x, T * d, RL_F32).reshape(T, d))
    np.testing.assert_array_equal(outs[0], table[tokens])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("d", [1, 64, 100, 4096])
@pytest.mark.parametrize("out_f32", [False, True])
def test_rmsnorm(devs, rng, d, out_f32):
    gpu, cpu = devs
    rows = 37
    x = (rng.standard_normal((rows, d)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    w = bf16_round(1 + 0.3 * rng.standard_normal(d).astype(np.float32))
    outs = []
    for dev in (gpu, cpu):
        odt = RL_F32 if out_f32 else dev.b.act_dtype
        xp, wp, y = dev.put(x, RL_F32), dev.put(w, dev.b.weight_dtype), dev.empty(rows * d, odt)
        dev.check(dev.b.rmsnorm(dev.bp, xp, wp, y, odt, rows, d, 1e-6))
        outs.append(dev.get(y, rows * d, odt).reshape(rows, d))
    if out_f32:
        assert_close(outs[0], outs[1], 1e-5, "rmsnorm")
    else:
        assert_out(gpu, outs[0], outs[1], BF16_EPS, "rmsnorm")


@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (37, 96, 200), (300, 256, 128), (5, 24, 8)])
@pytest.mark.parametrize("accumulate", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm(devs, rng, M, N, K, accumulate, with_bias):
    gpu, cpu = devs
    x = bf16_round(rng.standard_normal((M, K)).astype(np.float32))
    w = bf16_round((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32))
    bias = bf16_round(rng.standard_normal(N).astype(np.float32)) if with_bias else None
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    lens = [M] if M < 3 else [M // 3, M - 2 * (M // 3), M // 3]
    outs = []
    for dev in (gpu, cpu):
        seg, _cu = dev.segments(lens)
        ydt = dev.b.res_dtype if accumulate else dev.b.act_dtype
        xp, wp = dev.put(x, dev.b.act_dtype), dev.put(w, dev.b.weight_dtype)
        biasp = dev.put(bias, dev.b.weight_dtype) if with_bias else None
        y = dev.put(y0, RL_F32) if accumulate else dev.empty(M * N, ydt)
        dev.check(dev.b.gemm(dev.bp, C.byref(seg), xp, wp, biasp, y, M, N, K, accumulate))
        outs.append(dev.get(y, M * N, ydt).reshape(M, N))
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (bias if with_bias else 0)
    if accumulate:
        ref = ref + y0
    # f32 outputs: tensor-core f32 accumulation differs from sgemm's order only
    assert_close(outs[1], ref.astype(np.float32), 1e-3, "cpu gemm vs numpy")
    if accumulate:
        assert_close(outs[0], outs[1], 1e-3, "gemm")
    else:
        assert_out(gpu, outs[0], outs[1], BF16_EPS, "gemm")
    if gpu.dtype == RL_F32:  # fp32 mode: f32 GEMM (no TF32) against the f64 product
        assert_close(outs[0], ref.astype(np.float32), F32_REL, "gemm [f32 mode] vs numpy",
                     floor=F32_FLOOR)


def rope_inv_freq(hd: int, theta: float = 10000.0) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)


@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 64), (2, 1, 128), (3, 3, 16), (2, 2, 80)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_rope(devs, rng, nh, nkv, hd, qk_norm):
    gpu, cpu = devs
    lens = [1, 7, 130]
    T, W = sum(lens), (nh + 2 * nkv) * hd
    qkv = bf16_round(rng.standard_normal((T, W)).astype(np.float32))
    qn = bf16_round(1 + 0.3 * rng.standard_normal(hd).astype(np.float32))
    kn = bf16_round(1 + 0.3 * rng.standard_normal(hd).astype(np.float32))
    inv = rope_inv_freq(hd)
    outs = []
    for dev in (gpu, cpu):
        seg, _cu = dev.segments(lens)
        p = dev.put(qkv, dev.b.act_dtype)
        qp = dev.put(qn, dev.b.weight_dtype) if qk_norm else None
        kp = dev.put(kn, dev.b.weight_dtype) if qk_norm else None
        invp = dev.put(inv, RL_F32)
        dev.check(dev.b.qk_norm_rope(dev.bp, C.byref(seg), p, T, nh, nkv, hd, qp, kp, 1e-6, invp))
        outs.append(dev.get(p, T * W, dev.b.act_dtype).reshape(T, W))
    v0 = (nh + nkv) * hd
    np.testing.assert_array_equal(outs[0][:, v0:], qkv[:, v0:])  # v untouched
    assert_out(gpu, outs[0], outs[1], 2 * BF16_EPS, "qk_norm_rope")


ATTN_CASES = [
    (64, 4, 2, [1, 5, 64, 65, 130]),
    (128, 4, 1, [200, 3, 1]),
    (128, 8, 8, [17]),
    (16, 2, 2, [70, 1]),
    (32, 4, 2, [33]),
    (80, 2, 1, [40, 90]),
    (96, 3, 1, [129]),
    (256, 2, 2, [33, 100]),
]


@pytest.mark.parametrize("kernel", ["mma", "fma"])
@pytest.mark.parametrize("hd,nh,nkv,lens", ATTN_CASES)
def test_attention(devs, rng, monkeypatch, kernel, hd, nh, nkv, lens):
    """Both kernels: tensor cores (default; P rounded to bf16 as in FA2) and
    f32 FMA (RJEPA_ATTN=fma; only the output is rounded). The fp32 mode runs
    the FMA kernel on f32 q/k/v whatever RJEPA_ATTN says."""
    gpu0, cpu = devs
    monkeypatch.setenv("RJEPA_ATTN", kernel)  # read when a backend is created
    gpu = Dev(cpu.lib, "cuda", gpu0.dtype)
    T, W = sum(lens), (nh + 2 * nkv) * hd
    qkv = rng.standard_normal((T, W)).astype(np.float32)
    qkv[:, : nh * hd] *= 3.0  # sharper softmax than unit scores
    qkv = bf16_round(qkv)
    scale = float(1.0 / np.sqrt(hd))
    outs = []
    for dev in (gpu, cpu):
        seg, _cu = dev.segments(lens)
        p, o = dev.put(qkv, dev.b.act_dtype), dev.empty(T * nh * hd, dev.b.act_dtype)
        dev.check(dev.b.attention(dev.bp, C.byref(seg), p, o, T, nh, nkv, hd, scale))
        outs.append(dev.get(o, T * nh * hd, dev.b.act_dtype).reshape(T, nh * hd))
    gpu.close()
    if gpu.dtype == RL_F32:
        assert_close(outs[0], outs[1], F32_REL, f"attention [f32 mode, RJEPA_ATTN={kernel}]",
                     floor=F32_FLOOR)
    elif kernel == "fma":
        assert_close(outs[0], outs[1], 2 * BF16_EPS, "attention (fma)")
    else:
        # bf16 P: errors ~2^-9 of sum(p |v|), not of |out|: a floor of rms/2
        assert_close(outs[0], outs[1], 4 * BF16_EPS, "attention (mma)", floor=0.5)
        rel = np.linalg.norm(outs[0] - outs[1]) / np.linalg.norm(outs[1])
        assert rel < 5e-3, f"attention (mma): relative error {rel:.3g}"


def test_attention_unsupported_head_dim_is_an_error(devs_bf16):
    gpu, _ = devs_bf16
    seg, _cu = gpu.segments([4])
    p, o = gpu.empty(4 * 3 * 24, RL_BF16), gpu.empty(4 * 24, RL_BF16)
    st = gpu.b.attention(gpu.bp, C.byref(seg), p, o, 4, 1, 1, 24, 0.2)
    assert st == 1 and b"head_dim 24" in gpu.lib.rl_last_error()


@pytest.mark.parametrize("ff", [64, 100, 1376])
def test_swiglu(devs, rng, ff):
    gpu, cpu = devs
    T = 33
    gu = bf16_round((2 * rng.standard_normal((T, 2 * ff))).astype(np.float32))
    outs = []
    for dev in (gpu, cpu):
        p, o = dev.put(gu, dev.b.act_dtype), dev.empty(T * ff, dev.b.act_dtype)
        dev.check(dev.b.swiglu(dev.bp, p, o, T, ff))
        outs.append(dev.get(o, T * ff, dev.b.act_dtype).reshape(T, ff))
    assert_out(gpu, outs[0], outs[1], BF16_EPS, "swiglu")


@pytest.mark.parametrize("mode", [POOL_MEAN, POOL_FIRST, POOL_LAST])
@pytest.mark.parametrize("d", [64, 100])
def test_pool(devs_bf16, rng, mode, d):
    gpu, cpu = devs_bf16
    T = 300
    x = rng.standard_normal((T, d)).astype(np.float32)
    spans = np.array([[0, 1], [0, 300], [5, 6], [10, 250], [299, 300], [17, 40]], np.int32)
    S = len(spans)
    outs = []
    for dev in (gpu, cpu):
        xp, sp, o = dev.put(x, RL_F32), dev.put_i32(spans), dev.empty(S * d, RL_F32)
        dev.check(dev.b.pool(dev.bp, xp, RL_F32, d, sp, S, mode, o))
        outs.append(dev.get(o, S * d, RL_F32).reshape(S, d))
    assert_close(outs[0], outs[1], 1e-3, "pool f32")  # f32 vs f64 sums of up to 300 rows
    # bf16 source (CUDA only): against numpy over the bf16 values
    xb = bf16_round(x)
    xp, sp, o = gpu.put(xb, RL_BF16), gpu.put_i32(spans), gpu.empty(S * d, RL_F32)
    gpu.check(gpu.b.pool(gpu.bp, xp, RL_BF16, d, sp, S, mode, o))
    ref = np.stack([xb[a:b].mean(0) if mode == POOL_MEAN else xb[a if mode == POOL_FIRST else b - 1]
                    for a, b in spans])
    assert_close(gpu.get(o, S * d, RL_F32).reshape(S, d), ref, 1e-3, "pool bf16")


@pytest.mark.parametrize("src_dtype", [RL_F32, RL_F16, RL_BF16])
def test_upload_conversions(devs_bf16, rng, src_dtype):
    """Host f32/f16/bf16 -> device bf16 at an element offset, and -> f32; one
    tensor larger than the 32 MiB staging buffer (several chunks)."""
    gpu, _ = devs_bf16
    for n in (1001, 17_000_000):
        vals = rng.standard_normal(n).astype(np.float32)
        if src_dtype == RL_F16:
            src = vals.astype(np.float16)
            exact = src.astype(np.float32)
        elif src_dtype == RL_BF16:
            exact = bf16_round(vals)
            src = (exact.view(np.uint32) >> 16).astype(np.uint16)
        else:
            src = exact = vals
        off = 3
        p = gpu.empty(n + off, RL_BF16)
        gpu.upload(p, src, RL_BF16, offset=off, src_dtype=src_dtype)
        got = gpu.get(p, n + off, RL_BF16)
        assert np.isnan(got[:off]).all()  # the elements before the offset are not touched
        np.testing.assert_array_equal(got[off:], bf16_round(exact))
        if n < 10_000:
            q = gpu.empty(n, RL_F32)
            gpu.upload(q, src, RL_F32, src_dtype=src_dtype)
            np.testing.assert_array_equal(gpu.get(q, n, RL_F32), exact)


def test_residency_and_mem_info(devs_bf16):
    gpu, _ = devs_bf16
    p = gpu.alloc(1 << 20)
    assert gpu.b.is_resident(gpu.bp, p) == 1
    host = np.zeros(16, np.float32)
    assert gpu.b.is_resident(gpu.bp, host.ctypes.data) == 0
    free_b, total_b = C.c_size_t(), C.c_size_t()
    gpu.check(gpu.b.mem_info(gpu.bp, C.byref(free_b), C.byref(total_b)))
    assert 0 < free_b.value <= total_b.value
    hp = VP()
    gpu.check(gpu.b.host_alloc(gpu.bp, C.byref(hp), 4096))
    assert hp.value and gpu.b.is_resident(gpu.bp, hp.value) == 0
    gpu.b.host_free(gpu.bp, hp.value)

"""The emulated CUDA device itself (kernels/emu), built here as a small
shared library from its sources and driven through ctypes; no GPU, no CUDA
toolkit (the header comparison uses the toolkit when it is installed).

- the runtime header's enum values and struct layout equal the toolkit's;
- mma.m16n8k16 (bf16, f32 accumulate) and ldmatrix.x2.trans against the
  PTX ISA fragment tables, written below as data (which lane and register
  half holds which matrix element, transcribed from the ISA's figures), and
  against a plain matrix product; a test of the test: a permuted table fails;
- __shfl_xor_sync; a block sum through shared memory is right in every
  thread order with its barriers and wrong without them;
- barrier misuse (a deadlock, threads at different barriers, a shuffle a
  lane skips, lanes in different shuffles) ends as a launch failure with a
  diagnostic, never a hang (each in its own process: the fault is sticky);
  so does a fault injected with RJEPA_EMU_FAULT_KERNEL;
- memory: NaN-filled allocations, the configured device size, refusals;
  streams run asynchronously (a read before the sync sees old data), sync
  counters count;
- the cuBLAS stand-in's GemmEx against NumPy for every transpose, dtype and
  alpha/beta combination, padded leading dimensions, beta = 0 not reading C,
  and an operand past its allocation refused.
"""
from __future__ import annotations

import ctypes as C
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from test_backend_ops import _setup_globals  # setup.py's helpers (the emulated build flags)

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "kernels" / "emu"
cudaSuccess, cudaErrorMemoryAllocation, cudaErrorLaunchFailure = 0, 2, 719
cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2


@pytest.fixture(scope="session")
def emu_lib_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emu") / "libemu_device.so"
    flags = _setup_globals()["emulated_cxx_flags"](True)
    srcs = [str(p) for p in sorted(EMU.glob("*.cpp"))]
    r = subprocess.run([os.environ.get("CXX", "g++"), "-shared", *flags, *srcs, "-o", str(out),
                        "-lpthread"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _bind(lib: C.CDLL) -> C.CDLL:
    P, I, S = C.c_void_p, C.c_int, C.c_size_t
    for name, args in {
        "rl_emu_probe_mma": [P, P, P], "rl_emu_probe_ldmatrix_x2_trans": [P, P, P],
        "rl_emu_probe_shfl_xor": [P, I, P], "rl_emu_probe_block_sum": [P, P, I, I],
        "rl_emu_probe_misuse": [I], "cudaMalloc": [C.POINTER(P), S], "cudaFree": [P],
        "cudaHostAlloc": [C.POINTER(P), S, C.c_uint], "cudaFreeHost": [P],
        "cudaMemcpy": [P, P, S, I], "cudaMemcpyAsync": [P, P, S, I, P],
        "cudaMemGetInfo": [C.POINTER(S), C.POINTER(S)], "cudaStreamCreateWithFlags": [C.POINTER(P), C.c_uint],
        "cudaStreamSynchronize": [P], "cudaStreamDestroy": [P],
        "cudaLaunchHostFunc": [P, P, P], "cublasCreate_v2": [C.POINTER(P)],
        "cublasDestroy_v2": [P], "cublasSetStream_v2": [P, P],
        "cublasGemmEx": [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, C.c_int
    lib.rl_emu_set_order.argtypes, lib.rl_emu_set_order.restype = [C.c_int, C.c_ulonglong], None
    lib.rl_emu_last_diagnostic.restype = C.c_char_p
    lib.rl_emu_get_counters.argtypes, lib.rl_emu_get_counters.restype = [P], None
    return lib


@pytest.fixture(scope="session")
def emu(emu_lib_path) -> C.CDLL:
    return _bind(C.CDLL(str(emu_lib_path)))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even bf16, as bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- the runtime header ----------------------------------------------------

def _toolkit_include() -> Path | None:
    from test_cuda_build import _cuda_include
    return _cuda_include()


def test_runtime_header_values_match_the_toolkit(tmp_path):
    inc = _toolkit_include()
    if inc is None:
        pytest.skip("no CUDA toolkit headers here to compare with")
    text = (EMU / "include" / "cuda_runtime_api.h").read_text()
    names = re.findall(r"^\s+(cuda\w+) = ", text, re.M)
    names += [n for n in re.findall(r"^#define (cuda\w+) ", text, re.M)]
    assert len(names) > 40
    prog = "#include <stddef.h>\n#include <stdio.h>\n#include <cuda_runtime_api.h>\nint main(void) {\n"
    prog += "".join(f'    printf("{n} %lld\\n", (long long)(size_t)({n}));\n' for n in names)
    prog += "".join(f'    printf("{f} %zu\\n", offsetof(struct cudaPointerAttributes, {f}));\n'
                    for f in ("type", "device", "devicePointer", "hostPointer"))
    prog += '    printf("size %zu\\n", sizeof(struct cudaPointerAttributes));\n    return 0;\n}\n'
    (tmp_path / "v.c").write_text(prog)
    outs = []
    for include in (EMU / "include", inc):
        exe = tmp_path / f"v{len(outs)}"
        r = subprocess.run(["cc", "-I", str(include), str(tmp_path / "v.c"), "-o", str(exe)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(subprocess.run([str(exe)], capture_output=True, text=True).stdout)
    assert outs[0] == outs[1]


# ---- fragment tables (PTX ISA, "Matrix Fragments for mma.m16n8k16" with
# .bf16 and "ldmatrix"): cell = "lane.e", element e of that lane's fragment;
# element e sits in register e // 2, low half for even e.

MMA_A = """
0.0 0.1 1.0 1.1 2.0 2.1 3.0 3.1 0.4 0.5 1.4 1.5 2.4 2.5 3.4 3.5
4.0 4.1 5.0 5.1 6.0 6.1 7.0 7.1 4.4 4.5 5.4 5.5 6.4 6.5 7.4 7.5
8.0 8.1 9.0 9.1 10.0 10.1 11.0 11.1 8.4 8.5 9.4 9.5 10.4 10.5 11.4 11.5
12.0 12.1 13.0 13.1 14.0 14.1 15.0 15.1 12.4 12.5 13.4 13.5 14.4 14.5 15.4 15.5
16.0 16.1 17.0 17.1 18.0 18.1 19.0 19.1 16.4 16.5 17.4 17.5 18.4 18.5 19.4 19.5
20.0 20.1 21.0 21.1 22.0 22.1 23.0 23.1 20.4 20.5 21.4 21.5 22.4 22.5 23.4 23.5
24.0 24.1 25.0 25.1 26.0 26.1 27.0 27.1 24.4 24.5 25.4 25.5 26.4 26.5 27.4 27.5
28.0 28.1 29.0 29.1 30.0 30.1 31.0 31.1 28.4 28.5 29.4 29.5 30.4 30.5 31.4 31.5
0.2 0.3 1.2 1.3 2.2 2.3 3.2 3.3 0.6 0.7 1.6 1.7 2.6 2.7 3.6 3.7
4.2 4.3 5.2 5.3 6.2 6.3 7.2 7.3 4.6 4.7 5.6 5.7 6.6 6.7 7.6 7.7
8.2 8.3 9.2 9.3 10.2 10.3 11.2 11.3 8.6 8.7 9.6 9.7 10.6 10.7 11.6 11.7
12.2 12.3 13.2 13.3 14.2 14.3 15.2 15.3 12.6 12.7 13.6 13.7 14.6 14.7 15.6 15.7
16.2 16.3 17.2 17.3 18.2 18.3 19.2 19.3 16.6 16.7 17.6 17.7 18.6 18.7 19.6 19.7
20.2 20.3 21.2 21.3 22.2 22.3 23.2 23.3 20.6 20.7 21.6 21.7 22.6 22.7 23.6 23.7
24.2 24.3 25.2 25.3 26.2 26.3 27.2 27.3 24.6 24.7 25.6 25.7 26.6 26.7 27.6 27.7
28.2 28.3 29.2 29.3 30.2 30.3 31.2 31.3 28.6 28.7 29.6 29.7 30.6 30.7 31.6 31.7
"""
# B is 16 (k) x 8 (n)
MMA_B = """
0.0 4.0 8.0 12.0 16.0 20.0 24.0 28.0
0.1 4.1 8.1 12.1 16.1 20.1 24.1 28.1
1.0 5.0 9.0 13.0 17.0 21.0 25.0 29.0
1.1 5.1 9.1 13.1 17.1 21.1 25.1 29.1
2.0 6.0 10.0 14.0 18.0 22.0 26.0 30.0
2.1 6.1 10.1 14.1 18.1 22.1 26.1 30.1
3.0 7.0 11.0 15.0 19.0 23.0 27.0 31.0
3.1 7.1 11.1 15.1 19.1 23.1 27.1 31.1
0.2 4.2 8.2 12.2 16.2 20.2 24.2 28.2
0.3 4.3 8.3 12.3 16.3 20.3 24.3 28.3
1.2 5.2 9.2 13.2 17.2 21.2 25.2 29.2
1.3 5.3 9.3 13.3 17.3 21.3 25.3 29.3
2.2 6.2 10.2 14.2 18.2 22.2 26.2 30.2
2.3 6.3 10.3 14.3 18.3 22.3 26.3 30.3
3.2 7.2 11.2 15.2 19.2 23.2 27.2 31.2
3.3 7.3 11.3 15.3 19.3 23.3 27.3 31.3
"""
# C / D are 16 x 8, one f32 per element (element e = register e)
MMA_C = """
0.0 0.1 1.0 1.1 2.0 2.1 3.0 3.1
4.0 4.1 5.0 5.1 6.0 6.1 7.0 7.1
8.0 8.1 9.0 9.1 10.0 10.1 11.0 11.1
12.0 12.1 13.0 13.1 14.0 14.1 15.0 15.1
16.0 16.1 17.0 17.1 18.0 18.1 19.0 19.1
20.0 20.1 21.0 21.1 22.0 22.1 23.0 23.1
24.0 24.1 25.0 25.1 26.0 26.1 27.0 27.1
28.0 28.1 29.0 29.1 30.0 30.1 31.0 31.1
0.2 0.3 1.2 1.3 2.2 2.3 3.2 3.3
4.2 4.3 5.2 5.3 6.2 6.3 7.2 7.3
8.2 8.3 9.2 9.3 10.2 10.3 11.2 11.3
12.2 12.3 13.2 13.3 14.2 14.3 15.2 15.3
16.2 16.3 17.2 17.3 18.2 18.3 19.2 19.3
20.2 20.3 21.2 21.3 22.2 22.3 23.2 23.3
24.2 24.3 25.2 25.3 26.2 26.3 27.2 27.3
28.2 28.3 29.2 29.3 30.2 30.3 31.2 31.3
"""
# ldmatrix .m8n8 .x2 .trans: each 8x8 b16 matrix i (rows given by lanes 8i..8i+7)
# lands in register i of every lane; with .trans lane l holds column l / 4
LDMATRIX_TRANS = """
0.0 4.0 8.0 12.0 16.0 20.0 24.0 28.0
0.1 4.1 8.1 12.1 16.1 20.1 24.1 28.1
1.0 5.0 9.0 13.0 17.0 21.0 25.0 29.0
1.1 5.1 9.1 13.1 17.1 21.1 25.1 29.1
2.0 6.0 10.0 14.0 18.0 22.0 26.0 30.0
2.1 6.1 10.1 14.1 18.1 22.1 26.1 30.1
3.0 7.0 11.0 15.0 19.0 23.0 27.0 31.0
3.1 7.1 11.1 15.1 19.1 23.1 27.1 31.1
"""


def _table(text: str) -> list[list[tuple[int, int]]]:
    """grid of (lane, element) per matrix cell; each (lane, element) once."""
    rows = [[tuple(int(x) for x in cell.split(".")) for cell in ln.split()]
            for ln in text.strip().splitlines()]
    cells = [c for r in rows for c in r]
    assert len(set(cells)) == len(cells)
    return rows


def _pack_bf16(mat: np.ndarray, table, regs: int) -> np.ndarray:
    """Per-lane registers [32, regs] (uint32, two bf16 each) holding `mat` as `table` says."""
    bits = _bf16_bits(mat)
    out = np.zeros((32, regs), np.uint32)
    for r, row in enumerate(table):
        for c, (lane, e) in enumerate(row):
            out[lane, e // 2] |= np.uint32(int(bits[r, c]) << (16 * (e % 2)))
    return out


def _mma(emu, A, B, Cm, table_a=None) -> np.ndarray:
    a = _pack_bf16(A, table_a or _table(MMA_A), 4)
    b = _pack_bf16(B, _table(MMA_B), 2)
    c = np.zeros((32, 4), np.float32)
    tc = _table(MMA_C)
    for r, row in enumerate(tc):
        for col, (lane, e) in enumerate(row):
            c[lane, e] = Cm[r, col]
    assert emu.rl_emu_probe_mma(_ptr(a), _ptr(b), _ptr(c)) == cudaSuccess
    D = np.zeros((16, 8), np.float32)
    for r, row in enumerate(tc):
        for col, (lane, e) in enumerate(row):
            D[r, col] = c[lane, e]
    return D


def test_mma_matches_the_fragment_tables_and_a_matrix_product(emu):
    rng = np.random.default_rng(1)
    for _ in range(3):
        A = _bf16_value(_bf16_bits(rng.standard_normal((16, 16))))
        B = _bf16_value(_bf16_bits(rng.standard_normal((16, 8))))
        Cm = rng.standard_normal((16, 8)).astype(np.float32)
        D = _mma(emu, A, B, Cm)
        ref = A.astype(np.float64) @ B.astype(np.float64) + Cm
        np.testing.assert_allclose(D, ref, rtol=1e-6, atol=1e-6)
    # one-hot operands: each element reaches exactly the place the tables say
    for r, k in ((0, 0), (3, 9), (8, 1), (15, 15), (9, 12)):
        A = np.zeros((16, 16), np.float32)
        A[r, k] = 1
        B = np.arange(1, 129, dtype=np.float32).reshape(16, 8)
        D = _mma(emu, A, B, np.zeros((16, 8), np.float32))
        want = np.zeros((16, 8))
        want[r] = B[k]
        np.testing.assert_array_equal(D, want)


def test_a_permuted_fragment_table_fails(emu):
    """The check can fail: A's registers 1 and 2 swapped (rows g + 8 and
    columns 2t + 8 exchanged) gives a different product."""
    rng = np.random.default_rng(2)
    A = _bf16_value(_bf16_bits(rng.standard_normal((16, 16))))
    B = _bf16_value(_bf16_bits(rng.standard_normal((16, 8))))
    swapped = [[(lane, {2: 4, 3: 5, 4: 2, 5: 3}.get(e, e)) for lane, e in row]
               for row in _table(MMA_A)]
    D = _mma(emu, A, B, np.zeros((16, 8), np.float32), swapped)
    assert np.abs(D - A.astype(np.float64) @ B).max() > 0.5


def test_ldmatrix_x2_trans_matches_its_table(emu):
    stride = 24  # elements per shared-memory row: 48 bytes, 16-byte aligned rows
    mem = np.zeros(16 * stride + 8, np.uint16)
    base = (-mem.ctypes.data // 2) % 8  # first row 16-byte aligned
    vals = np.arange(1, 129, dtype=np.uint16).reshape(2, 8, 8)
    for m in range(2):
        for r in range(8):
            mem[base + (8 * m + r) * stride: base + (8 * m + r) * stride + 8] = vals[m, r]
    offs = np.array([base + (l % 16) * stride for l in range(32)], np.int32)
    out = np.zeros((32, 2), np.uint32)
    assert emu.rl_emu_probe_ldmatrix_x2_trans(_ptr(mem), _ptr(offs), _ptr(out)) == cudaSuccess
    table = _table(LDMATRIX_TRANS)
    for m in range(2):
        for r in range(8):
            for c in range(8):
                lane, e = table[r][c]
                assert (int(out[lane, m]) >> (16 * e)) & 0xFFFF == vals[m, r, c], (m, r, c)


def test_shfl_xor(emu):
    x = np.arange(32, dtype=np.float32) * 1.5
    for m in (1, 2, 4, 8, 16, 31):
        out = np.zeros(32, np.float32)
        assert emu.rl_emu_probe_shfl_xor(_ptr(x), m, _ptr(out)) == cudaSuccess
        np.testing.assert_array_equal(out, x[np.arange(32) ^ m])


@pytest.mark.parametrize("order", [0, 1, 2])
def test_barriers_order_threads_and_missing_ones_show(emu, order):
    rng = np.random.default_rng(order)
    emu.rl_emu_set_order(order, 5)
    try:
        for threads in (64, 256):
            x = rng.standard_normal(threads).astype(np.float32)
            out = np.zeros(threads, np.float32)
            assert emu.rl_emu_probe_block_sum(_ptr(x), _ptr(out), threads, 1) == cudaSuccess
            np.testing.assert_allclose(out, np.float32(x.astype(np.float64).sum()), rtol=1e-5, atol=1e-5)
            y = rng.standard_normal(threads).astype(np.float32)
            assert emu.rl_emu_probe_block_sum(_ptr(y), _ptr(out), threads, 0) == cudaSuccess
            assert not np.allclose(out, y.sum(), rtol=1e-4), "a missing barrier went unnoticed"
    finally:
        emu.rl_emu_set_order(0, 0)


MISUSE = {1: "barrier deadlock", 2: "different __syncthreads", 3: "lane\\(s\\) of the warp have exited|left the kernel while lanes of its warp wait",
          4: "different warp collectives"}


@pytest.mark.parametrize("which", sorted(MISUSE))
def test_barrier_misuse_is_an_error_not_a_hang(emu_lib_path, which):
    code = textwrap.dedent(f"""
        import ctypes, sys
        lib = ctypes.CDLL({str(emu_lib_path)!r})
        rc = lib.rl_emu_probe_misuse({which})
        lib.rl_emu_last_diagnostic.restype = ctypes.c_char_p
        print(rc, lib.cudaGetLastError(), lib.rl_emu_last_diagnostic().decode())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rc, last, diag = r.stdout.split(" ", 2)
    assert int(rc) == cudaErrorLaunchFailure and int(last) == cudaErrorLaunchFailure  # sticky
    assert re.search(MISUSE[which], diag), diag
    assert "kernel probe, block (0,0,0)" in diag


def test_an_injected_fault_is_sticky(emu_lib_path):
    code = textwrap.dedent(f"""
        import ctypes as C, numpy as np
        lib = C.CDLL({str(emu_lib_path)!r})
        x = np.zeros(32, np.float32)
        rc = lib.rl_emu_probe_shfl_xor(C.c_void_p(x.ctypes.data), 1, C.c_void_p(x.ctypes.data))
        p = C.c_void_p()
        print(rc, lib.cudaGetLastError(), lib.cudaMalloc(C.byref(p), C.c_size_t(16)))
    """)
    env = {**os.environ, "RJEPA_EMU_FAULT_KERNEL": "probe"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["700"] * 3  # cudaErrorIllegalAddress, then on every call
    assert "fault injected by RJEPA_EMU_FAULT_KERNEL" in r.stderr


# ---- memory, streams, counters ---------------------------------------------

def test_memory_is_nan_filled_and_the_device_size_is_configurable(emu_lib_path):
    code = textwrap.dedent(f"""
        import ctypes as C, numpy as np
        lib = C.CDLL({str(emu_lib_path)!r})
        free, total = C.c_size_t(), C.c_size_t()
        assert lib.cudaMemGetInfo(C.byref(free), C.byref(total)) == 0
        assert total.value == 64 << 20 and free.value == total.value, (free, total)
        p, q = C.c_void_p(), C.c_void_p()
        assert lib.cudaMalloc(C.byref(p), C.c_size_t(40 << 20)) == 0
        assert lib.cudaMemGetInfo(C.byref(free), C.byref(total)) == 0
        assert free.value == 24 << 20
        assert lib.cudaMalloc(C.byref(q), C.c_size_t(32 << 20)) == 2   # cudaErrorMemoryAllocation
        assert lib.cudaGetLastError() == 2 and lib.cudaGetLastError() == 0  # not sticky
        host = np.zeros(1000, np.float32)
        assert lib.cudaMemcpy(C.c_void_p(host.ctypes.data), p, C.c_size_t(4000), 2) == 0
        assert np.isnan(host).all() and (host.view(np.uint32) == 0xFFFFFFFF).all()
        assert lib.cudaFree(p) == 0 and lib.cudaFree(p) != 0
        print("ok")
    """)
    env = {**os.environ, "RJEPA_EMU_DEVICE_MEMORY": "64MiB"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


class Counters(C.Structure):
    _fields_ = [(n, C.c_longlong) for n in (
        "stream_syncs", "event_syncs", "device_syncs", "blocking_copies", "launches", "blocks",
        "gemms", "h2d_bytes", "d2h_bytes", "device_bytes_in_use", "device_bytes_peak")]


def counters(lib) -> Counters:
    c = Counters()
    lib.rl_emu_get_counters(C.byref(c))
    return c


def test_streams_are_asynchronous_and_syncs_are_counted(emu):
    import time
    stream, dev, pinned = C.c_void_p(), C.c_void_p(), C.c_void_p()
    assert emu.cudaStreamCreateWithFlags(C.byref(stream), 1) == 0
    assert emu.cudaMalloc(C.byref(dev), 4096) == 0
    assert emu.cudaHostAlloc(C.byref(pinned), 4096, 0) == 0
    src = np.arange(1024, dtype=np.float32)
    assert emu.cudaMemcpy(dev, _ptr(src), 4096, cudaMemcpyHostToDevice) == 0
    host = np.ctypeslib.as_array(C.cast(pinned, C.POINTER(C.c_float)), (1024,))
    host[:] = -1
    slow = C.CFUNCTYPE(None, C.c_void_p)(lambda _: time.sleep(0.3))
    before = counters(emu).stream_syncs
    assert emu.cudaLaunchHostFunc(stream, C.cast(slow, C.c_void_p), None) == 0
    assert emu.cudaMemcpyAsync(pinned, dev, 4096, cudaMemcpyDeviceToHost, stream) == 0
    assert (host == -1).all()  # queued behind the slow work: not copied yet
    assert emu.cudaStreamSynchronize(stream) == 0
    np.testing.assert_array_equal(host, src)
    assert counters(emu).stream_syncs == before + 1
    # to pageable memory the copy blocks, as the real driver's does
    page = np.zeros(1024, np.float32)
    blocking = counters(emu).blocking_copies
    assert emu.cudaMemcpyAsync(_ptr(page), dev, 4096, cudaMemcpyDeviceToHost, stream) == 0
    np.testing.assert_array_equal(page, src)
    assert counters(emu).blocking_copies == blocking + 1
    for rc in (emu.cudaStreamDestroy(stream), emu.cudaFree(dev), emu.cudaFreeHost(pinned)):
        assert rc == 0


# ---- the cuBLAS stand-in ---------------------------------------------------

R_32F, R_16BF, COMPUTE_32F, OP_N, OP_T = 0, 14, 68, 0, 1


def _to_device(emu, arr: np.ndarray) -> C.c_void_p:
    p = C.c_void_p()
    assert emu.cudaMalloc(C.byref(p), arr.nbytes) == 0
    assert emu.cudaMemcpy(p, _ptr(arr), arr.nbytes, cudaMemcpyHostToDevice) == 0
    return p


def _stored(mat: np.ndarray, ld: int, dtype: int) -> np.ndarray:
    """Column-major storage of `mat` with leading dimension ld (padding NaN)."""
    rows, cols = mat.shape
    buf = np.full((cols, ld), np.nan, np.float32)
    buf[:, :rows] = mat.T
    buf = buf.reshape(-1)
    return _bf16_bits(buf) if dtype == R_16BF else buf


@pytest.mark.parametrize("types", [(R_16BF, R_16BF), (R_16BF, R_32F), (R_32F, R_32F)],
                         ids=["bf16-bf16", "bf16-f32", "f32-f32"])
@pytest.mark.parametrize("transa,transb", [(OP_T, OP_N), (OP_N, OP_N), (OP_N, OP_T), (OP_T, OP_T)])
def test_gemm_ex_matches_numpy(emu, types, transa, transb):
    ab, ct = types
    rng = np.random.default_rng(transa * 2 + transb)
    handle = C.c_void_p()
    assert emu.cublasCreate_v2(C.byref(handle)) == 0
    m, n, k = 37, 19, 70
    for alpha, beta in ((1.0, 0.0), (1.0, 1.0), (0.5, -2.0)):
        opa = rng.standard_normal((m, k)).astype(np.float32)
        opb = rng.standard_normal((k, n)).astype(np.float32)
        if ab == R_16BF:
            opa, opb = _bf16_value(_bf16_bits(opa)), _bf16_value(_bf16_bits(opb))
        a_st = opa if transa == OP_N else opa.T
        b_st = opb if transb == OP_N else opb.T
        lda, ldb, ldc = a_st.shape[0] + 3, b_st.shape[0] + 5, m + 2
        c0 = rng.standard_normal((m, n)).astype(np.float32)
        if ct == R_16BF:
            c0 = _bf16_value(_bf16_bits(c0))
        if beta == 0.0:
            c0[:] = np.nan  # must not be read
        A = _to_device(emu, _stored(a_st, lda, ab))
        B = _to_device(emu, _stored(b_st, ldb, ab))
        c_host = _stored(c0, ldc, ct)
        Cd = _to_device(emu, c_host)
        al, be = C.c_float(alpha), C.c_float(beta)
        assert emu.cublasGemmEx(handle, transa, transb, m, n, k, C.byref(al), A, ab, lda, B, ab,
                                ldb, C.byref(be), Cd, ct, ldc, COMPUTE_32F, -1) == 0
        got = np.empty_like(c_host)
        assert emu.cudaMemcpy(_ptr(got), Cd, got.nbytes, cudaMemcpyDeviceToHost) == 0
        got = (_bf16_value(got) if ct == R_16BF else got).reshape(n, ldc)
        ref = alpha * (opa.astype(np.float64) @ opb) + (beta * c0.astype(np.float64) if beta else 0)
        tol = 2.0 ** -8 if ct == R_16BF else 1e-6
        np.testing.assert_allclose(got[:, :m].T, ref, rtol=tol, atol=tol * np.abs(ref).max())
        assert np.isnan(got[:, m:]).all()  # the padding of C is not written
        for p in (A, B, Cd):
            assert emu.cudaFree(p) == 0
    assert emu.cublasDestroy_v2(handle) == 0


def test_gemm_ex_refuses_an_operand_past_its_allocation(emu):
    handle = C.c_void_p()
    assert emu.cublasCreate_v2(C.byref(handle)) == 0
    A = _to_device(emu, np.zeros(64, np.float32))
    B = _to_device(emu, np.zeros(64, np.float32))
    Cd = _to_device(emu, np.zeros(64, np.float32))
    al, be = C.c_float(1.0), C.c_float(0.0)
    # 8x8 with lda 9 reaches 71 floats into a 64-float allocation
    assert emu.cublasGemmEx(handle, OP_N, OP_N, 8, 8, 8, C.byref(al), A, R_32F, 9, B, R_32F, 8,
                            C.byref(be), Cd, R_32F, 8, COMPUTE_32F, -1) == 7
    assert b"outside its device allocation" in emu.rl_emu_last_diagnostic()
    for p in (A, B, Cd):
        assert emu.cudaFree(p) == 0
    assert emu.cublasDestroy_v2(handle) == 0

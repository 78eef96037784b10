"""Checks of the CUDA build that need no GPU (they run in CI).

- The cuBLAS constants and symbol names that kernels/cublas_loader.c uses
  without cuBLAS headers are compared with the real headers when some are
  available: $RJEPA_CUBLAS_INCLUDE (a directory holding cublas_api.h), or
  the include directory of a pip `nvidia-cublas` install (present on the GPU
  machine). A tiny C file static_asserts each of our values.
- With CUDA compiled in but no usable driver/device (this machine, CI), the
  device functions answer cleanly: count 0, DeviceError naming the reason.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cublas_include() -> Path | None:
    env = os.environ.get("RJEPA_CUBLAS_INCLUDE")
    if env:
        return Path(env)
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cublas/include"):
            p = Path(entry) / sub
            if (p / "cublas_api.h").exists():
                return p
    return None


def _cuda_include() -> Path | None:
    """CUDA headers: $CUDA_HOME, else the TOP that nvcc on PATH reports
    (nvcc may be a wrapper script outside the toolkit)."""
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True)
        for line in (r.stdout + r.stderr).splitlines():
            if "TOP=" in line:
                cands.insert(1, line.split("TOP=", 1)[1].strip().strip('"'))
    for home in cands:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


CHECK_C = r"""
#include <assert.h>
#include <cublas_api.h>
#include <library_types.h>
#include "cuda_internal.h"
#define SAME(ours, theirs) static_assert((int)(ours) == (int)(theirs), #ours " != " #theirs)
SAME(RL_CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_SUCCESS);
SAME(RL_CUBLAS_OP_N, CUBLAS_OP_N);
SAME(RL_CUBLAS_OP_T, CUBLAS_OP_T);
SAME(RL_CUBLAS_DEFAULT_MATH, CUBLAS_DEFAULT_MATH);
SAME(RL_CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F);
SAME(RL_CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT);
SAME(RL_CUDA_R_32F, CUDA_R_32F);
SAME(RL_CUDA_R_16BF, CUDA_R_16BF);
/* our int parameters stand for these enums: same size */
static_assert(sizeof(cublasOperation_t) == sizeof(int), "op size");
static_assert(sizeof(cublasComputeType_t) == sizeof(int), "compute size");
static_assert(sizeof(cudaDataType) == sizeof(int), "datatype size");
static_assert(sizeof(cublasGemmAlgo_t) == sizeof(int), "algo size");
static_assert(sizeof(cublasStatus_t) == sizeof(rl_cublas_status), "status size");
/* the prototypes we call through exist with these names */
static void *const used[] = {
    (void *)cublasCreate_v2, (void *)cublasDestroy_v2, (void *)cublasSetStream_v2,
    (void *)cublasSetWorkspace_v2, (void *)cublasSetMathMode, (void *)cublasGemmEx,
    (void *)cublasGetStatusString,
};
void *rl_check_used(int i) { return used[i]; }
"""


def test_cublas_constants_match_headers(tmp_path: Path) -> None:
    inc = _cublas_include()
    cuda_inc = _cuda_include()
    if inc is None or cuda_inc is None:
        pytest.skip("no cuBLAS headers (set RJEPA_CUBLAS_INCLUDE) or no CUDA toolkit headers")
    src = tmp_path / "check.c"
    src.write_text(CHECK_C)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-std=c11", "-Wall", "-Werror", "-c", str(src), "-o", str(tmp_path / "check.o"),
           "-DRL_WITH_CUDA", f"-I{inc}", f"-I{cuda_inc}", f"-I{ROOT / 'kernels'}",
           f"-I{ROOT / 'csrc'}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _core():
    from rjepa_latent import _native  # noqa: F401  (loads _core and the BLAS it needs)
    from rjepa_latent import _core
    return _core


def test_build_info_reports_cuda_flag() -> None:
    info = _core().build_info()
    assert isinstance(info["cuda"], bool)
    if info["cuda"] and "emulated" in info["cuda_arch"]:  # RJEPA_CUDA=emu
        assert info["cuda_arch"].startswith("emulated sm_90 on the CPU")
    elif info["cuda"]:
        assert "sm_90" in info["cuda_arch"] and "sm_80" in info["cuda_arch"]
    else:
        assert info["cuda_arch"] == ""


def test_device_errors_without_a_usable_device() -> None:
    """CUDA compiled in, no driver or no device: clean answers, no crash."""
    core = _core()
    if not core.build_info()["cuda"]:
        pytest.skip("CUDA not compiled in")
    from rjepa_latent.errors import DeviceError
    n = core.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if n > 0:
        with pytest.raises(DeviceError, match="out of range"):
            core.cuda_check_device(n)
        with pytest.raises(DeviceError, match="out of range"):
            core.cuda_check_device(-1)
        return
    for idx in (0, 3):
        with pytest.raises(DeviceError, match="no CUDA (driver|device)"):
            core.cuda_check_device(idx)
        with pytest.raises(DeviceError, match="no CUDA (driver|device)"):
            core.cuda_mem_info(idx)


def test_not_compiled_in_message() -> None:
    core = _core()
    if core.build_info()["cuda"]:
        pytest.skip("CUDA compiled in")
    from rjepa_latent.errors import DeviceError
    assert core.cuda_device_count() == 0
    with pytest.raises(DeviceError, match="not (compiled|built) in"):
        core.cuda_check_device(0)


def test_cuda_create_ex_dtype_and_device_checks() -> None:
    """rl_backend_cuda_create_ex (the fp32 mode's constructor) through ctypes:
    a dtype other than bf16/f32 is RL_ERR_INVALID before any device check; a
    valid one fails cleanly with RL_ERR_DEVICE where no device can be used."""
    import ctypes as C
    core = _core()
    lib = C.CDLL(core.__file__)
    lib.rl_last_error.restype = C.c_char_p
    create_ex = lib.rl_backend_cuda_create_ex
    create_ex.argtypes = [C.c_int, C.c_int, C.POINTER(C.c_void_p)]
    out = C.c_void_p(1)
    rl_f32, rl_f16, err_invalid, err_device = 0, 2, 1, 3
    if not core.build_info()["cuda"]:
        assert create_ex(0, rl_f32, C.byref(out)) == err_device and not out.value
        assert b"not built in" in lib.rl_last_error()
        return
    assert create_ex(0, rl_f16, C.byref(out)) == err_invalid and not out.value
    assert b"bf16 or f32" in lib.rl_last_error()
    if core.cuda_device_count() == 0:
        assert create_ex(0, rl_f32, C.byref(out)) == err_device and not out.value
        assert re.search(rb"no CUDA (driver|device)", lib.rl_last_error())

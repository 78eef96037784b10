"""The C op test, tests/backend_ops/test_backend_ops.c, compiled and run.

It calls every op of the backend table (struct rl_backend of csrc/engine.h)
through the header itself, so nothing here mirrors the struct. Its header
comment says what each mode compares and with which bounds.

- test_cpu_ops (CI, every push): the CPU backend against double-precision
  references, plus packing neutrality and the harness self-checks.
- test_cuda_variant_compiles_and_links (CI when nvcc exists): the CUDA
  variant (csrc + kernels/*.c + nvcc of kernels/*.cu, cudart static, as
  setup.py links the extension) builds, lists its cases and, without a
  device, skips with exit status 77 and the reason.
- test_cuda_ops (marked `gpu`; skipped cleanly without a CUDA device): every
  CUDA op in the bf16 and f32 storage modes against the CPU op.
- test_emulated_cuda_ops (CI, every push; needs only g++): the same CUDA mode
  on the emulated device (kernels/emu: the real kernels/*.cu and CUDA backend
  compiled by the host C++ compiler, blocks and warps emulated on the CPU),
  so every CUDA op and both attention kernels run without a GPU, and the
  device-only dequantization of AWQ / GPTQ / FP8 weights bitwise against
  csrc/quant_hf.c.
- test_emulated_cuda_ops_sanitized (CI): the same, built with AddressSanitizer
  and UndefinedBehaviorSanitizer (kernels, backend, engine and emulator), so
  an out-of-bounds access or undefined behaviour in a kernel fails it.

The binaries are compiled once per session into a temporary directory (or
$RJEPA_OPS_BINDIR), from the sources, include dirs, macros and libraries of
the Extension that setup.py defines (so the BLAS is the build's: OpenBLAS
from scipy-openblas32, or what setup.py uses without it); the CPU variant
takes ~2 s to compile and ~3 s to run on 2 cores. Knobs: CC (the C
compiler), RJEPA_TEST_CFLAGS (extra flags, split on spaces),
RJEPA_CUDA_KERNELS_OBJ (an object of kernels/cuda_kernels.cu already built,
e.g. by setup.py: skips the nvcc step), RJEPA_OPS_SEED (the seed; random
otherwise, printed either way).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_C = ROOT / "tests" / "backend_ops" / "test_backend_ops.c"
# setup.py's CUDA_ARCHS and PTX target: the test runs the kernels that ship
CUDA_GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                "-gencode", "arch=compute_90a,code=sm_90a", "-gencode",
                "arch=compute_90,code=compute_90"]
SM90 = ["-gencode", "arch=compute_90,code=sm_90"]
OPS = ("backend", "memory", "embed", "rmsnorm", "gemm", "qk_norm_rope", "attention", "glu",
       "pool", "upload", "download", "cast")
SKIP_RC = 77


@functools.lru_cache(maxsize=None)
def _setup_extension():
    """The Extension that setup.py builds (sources, include dirs, macros,
    libraries), captured by running setup.py with setuptools.setup replaced;
    None if that fails. Its BLAS is the test's BLAS: scipy-openblas32, or
    whatever setup.py uses in its place."""
    import runpy

    import setuptools
    captured: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(ROOT / "setup.py"))
        (ext,) = captured["ext_modules"]
        return ext
    except Exception as e:  # noqa: BLE001  (fall back to the fixed recipe below)
        print(f"test_backend_ops: setup.py's extension not captured ({e!r}); "
              "using csrc/*.c and scipy-openblas32 if importable")
        return None
    finally:
        setuptools.setup = real


def _engine_sources() -> list[str]:
    """The extension's C sources but the Python binding (binding*.c; kernels/*.c are
    empty without RL_WITH_CUDA)."""
    ext = _setup_extension()
    if ext is not None:
        srcs = [str(ROOT / s) for s in ext.sources if s.endswith(".c")]
    else:
        srcs = [str(p) for p in (ROOT / "csrc").glob("*.c")]
    return sorted(s for s in srcs if not Path(s).name.startswith("binding"))


def _blas_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of the extension build: its include dirs
    and macros, its libraries and their run paths."""
    ext = _setup_extension()
    if ext is not None:
        cflags = [f"-I{d}" for d in ext.include_dirs]
        cflags += [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros]
        ldflags = [f"-L{d}" for d in ext.library_dirs] + [f"-l{x}" for x in ext.libraries]
        ldflags += [f"-Wl,-rpath,{d}" for d in ext.runtime_library_dirs]
        return cflags, ldflags
    try:
        import scipy_openblas32 as ob
    except ImportError:
        return [], []
    lib = ob.get_lib_dir()
    return ["-I", ob.get_include_dir()], ["-L", lib, "-l" + ob.get_library(), "-Wl,-rpath," + lib]


def _cuda_home() -> Path | None:
    """The toolkit as setup.py finds it: $CUDA_HOME / $CUDA_PATH, else nvcc on
    PATH (or the TOP it reports, when nvcc is a wrapper script)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
        try:
            r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True, timeout=60)
            for line in (r.stdout + r.stderr).splitlines():
                if "TOP=" in line:
                    cands.append(line.split("TOP=", 1)[1].strip().strip('"'))
        except (OSError, subprocess.SubprocessError):
            pass
    for home in cands:
        if home and (Path(home) / "bin" / "nvcc").exists() and \
                (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home)
    return None


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _compile(out: Path, cuda_home: Path | None, gencode: list[str] = CUDA_GENCODE) -> Path:
    """Builds the test binary (CUDA variant when cuda_home is given, its
    kernels compiled for `gencode`; the emulated device's with cuda_home "emu"
    or "emu-sanitized")."""
    if cuda_home in ("emu", "emu-sanitized"):
        return _compile_emulated(out, sanitize=cuda_home == "emu-sanitized")
    out.mkdir(parents=True, exist_ok=True)
    exe = out / ("test_backend_ops_cuda" if cuda_home else "test_backend_ops_cpu")
    cflags, ldflags = _blas_flags()
    # setup.py's warnings; -ffp-contract=off: no fused multiply-add the source did not write
    cmd = [os.environ.get("CC", "cc"), "-O2", "-std=c11", "-fopenmp", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
           "-I", str(ROOT / "csrc"), *cflags, *os.environ.get("RJEPA_TEST_CFLAGS", "").split()]
    srcs = [str(TEST_C), *_engine_sources()]
    if cuda_home:  # kernels/*.c again below, with RL_WITH_CUDA
        srcs = [x for x in srcs if Path(x).parent.name != "kernels"]
    libs = []
    if cuda_home:
        objs = []
        prebuilt = os.environ.get("RJEPA_CUDA_KERNELS_OBJ")
        if prebuilt:
            objs.append(prebuilt)
        else:
            for cu in sorted((ROOT / "kernels").glob("*.cu")):
                obj = out / (cu.stem + ".o")
                r = _run([str(cuda_home / "bin" / "nvcc"), "-c", str(cu), "-o", str(obj), "-O3",
                          "-std=c++17", "-Xcompiler", "-fPIC", "-I", str(ROOT / "csrc"),
                          "--expt-relaxed-constexpr", "--threads", "0", *gencode], 600)
                assert r.returncode == 0, f"nvcc {cu.name} failed:\n{r.stderr[-4000:]}"
                objs.append(str(obj))
        libdir = cuda_home / ("lib64" if (cuda_home / "lib64").exists() else "lib")
        cmd += ["-DRL_WITH_CUDA=1", "-I", str(cuda_home / "include")]
        srcs += sorted(str(p) for p in (ROOT / "kernels").glob("*.c")) + objs
        libs = [str(libdir / "libcudart_static.a"), "-ldl", "-lrt", "-lpthread", "-lstdc++"]
    r = _run([*cmd, *srcs, "-o", str(exe), *ldflags, *libs, "-lm"], 300)
    assert r.returncode == 0, f"compiling the op test failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
    return exe


def _compile_emulated(out: Path, sanitize: bool) -> Path:
    """The op test on the emulated device: kernels/*.cu and kernels/emu/*.cpp
    by the host C++ compiler with setup.py's flags, the C sources as for the
    CUDA variant plus the emulator's headers; sanitize: ASan + UBSan on all of it."""
    out.mkdir(parents=True, exist_ok=True)
    exe = out / ("test_backend_ops_emu_sanitized" if sanitize else "test_backend_ops_emu")
    san = ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-fno-omit-frame-pointer"] if sanitize else []
    cxx = os.environ.get("CXX", "g++")
    cxx_flags = _setup_globals()["emulated_cxx_flags"](True) + san
    cmds = []
    for src in [*sorted((ROOT / "kernels").glob("*.cu")), *sorted((ROOT / "kernels" / "emu").glob("*.cpp"))]:
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        cmds.append([cxx, *lang, "-c", str(src), "-o", str(out / (src.stem + ".o")), *cxx_flags])
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=2) as pool:
        for cmd, r in zip(cmds, pool.map(lambda c: _run(c, 600), cmds)):
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}"
    cflags, ldflags = _blas_flags()
    cmd = [os.environ.get("CC", "cc"), "-O2", "-std=c11", "-fopenmp", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
           "-I", str(ROOT / "kernels" / "emu" / "include"), "-I", str(ROOT / "csrc"), *cflags,
           "-DRL_WITH_CUDA=1", "-DRL_CUDA_EMULATED=1", *san,
           *os.environ.get("RJEPA_TEST_CFLAGS", "").split()]
    srcs = [str(TEST_C), *(x for x in _engine_sources() if Path(x).parent.name != "kernels")]
    srcs += sorted(str(p) for p in (ROOT / "kernels").glob("*.c"))
    srcs += [c[c.index("-o") + 1] for c in cmds]
    r = _run([*cmd, *srcs, "-o", str(exe), *ldflags, "-lstdc++", "-lpthread", "-lm"], 600)
    assert r.returncode == 0, f"compiling the op test failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
    return exe


@functools.lru_cache(maxsize=None)
def _setup_globals() -> dict:
    """setup.py's module globals (its helper functions), setup() not run."""
    import runpy

    import setuptools
    real = setuptools.setup
    setuptools.setup = lambda **kw: None
    try:
        return runpy.run_path(str(ROOT / "setup.py"))
    finally:
        setuptools.setup = real


class _Builds:
    """Session cache of the binaries (a failed build is not retried): "cpu",
    "cuda" (kernels for setup.py's archs: what ships) and "cuda-link" (sm_90
    only, a third of the nvcc time: enough to show it compiles and links;
    the same binary as "cuda" when RJEPA_CUDA_KERNELS_OBJ is set)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path | BaseException] = {}

    def get(self, kind: str) -> Path:
        if kind == "cuda-link" and os.environ.get("RJEPA_CUDA_KERNELS_OBJ"):
            kind = "cuda"
        if kind not in self.done:
            try:
                if kind.startswith("emu"):
                    self.done[kind] = _compile(self.root / kind, kind)  # type: ignore[arg-type]
                elif kind.startswith("cuda"):
                    home = _cuda_home()
                    if home is None:
                        pytest.skip("nvcc not found: the CUDA variant cannot be built")
                    gencode = CUDA_GENCODE if kind == "cuda" else SM90
                    self.done[kind] = _compile(self.root / kind, home, gencode)
                else:
                    self.done[kind] = _compile(self.root / kind, None)
            except pytest.skip.Exception:
                raise
            except BaseException as e:  # noqa: BLE001  (kept, re-raised for every user)
                self.done[kind] = e
        got = self.done[kind]
        if isinstance(got, BaseException):
            raise got
        return got


@pytest.fixture(scope="session")
def builds(tmp_path_factory) -> _Builds:
    where = os.environ.get("RJEPA_OPS_BINDIR")  # gpu_check.sh: a known place for the sanitizer
    return _Builds(Path(where) if where else tmp_path_factory.mktemp("backend_ops"))


def _seed_args() -> list[str]:
    seed = os.environ.get("RJEPA_OPS_SEED")
    return ["--seed", seed] if seed else []


def _check_run(r: subprocess.CompletedProcess, mode: str) -> None:
    """Every case passed, and every op was run (no case silently gone)."""
    out = r.stdout + r.stderr
    sys.stdout.write(r.stdout)
    fails = [ln for ln in out.splitlines() if ln.startswith(("FAIL", "     "))]
    assert r.returncode == 0, f"{mode} op test failed (exit {r.returncode}):\n" + \
        "\n".join(fails[:60] or out.splitlines()[-40:])
    m = re.search(r"(\d+) cases, (\d+) passed, 0 failed", out)
    assert m and m.group(1) == m.group(2), out[-2000:]
    ran = {ln.split()[2] for ln in out.splitlines() if ln.startswith("ok  ")}
    assert ran >= set(OPS), f"ops never run: {sorted(set(OPS) - ran)}"


def test_cpu_ops(builds):
    exe = builds.get("cpu")
    r = _run([str(exe), "cpu", *_seed_args()], 300)
    _check_run(r, "cpu")
    n = int(re.search(r"(\d+) cases", r.stdout).group(1))
    assert n >= 60, f"only {n} cases ran"
    assert "harness" in r.stdout


def _have_device() -> bool | None:
    """The extension's answer (None when it cannot be imported here)."""
    try:
        from rjepa_latent import _core
    except Exception:  # noqa: BLE001  (not built / its BLAS missing: let the binary decide)
        return None
    return _core.cuda_device_count() > 0


def test_cuda_variant_compiles_and_links(builds):
    exe = builds.get("cuda-link")
    r = _run([str(exe), "cuda", "--list"], 60)
    assert r.returncode == 0, r.stderr
    listed = r.stdout.splitlines()
    for target in ("cuda-bf16", "cuda-f32"):
        for op in OPS:
            if op in ("pool", "upload", "download", "memory") and target != "cuda-bf16":
                continue
            assert any(ln.split()[:2] == [target, op] for ln in listed), (target, op)
    assert any(ln.startswith("cuda-bf16-fma  attention") for ln in listed)
    for target in ("cuda-bf16", "cuda-f32"):
        assert any(ln.split()[:2] == [target, "dequant"] for ln in listed), target
    if _have_device():
        return  # test_cuda_ops runs it
    r = _run([str(exe), "cuda"], 120)
    assert r.returncode == SKIP_RC and r.stdout.startswith("SKIP: "), (r.returncode, r.stdout,
                                                                        r.stderr)


def _emulated_core() -> bool:
    """The installed extension is the emulated device's build (RJEPA_CUDA=emu)."""
    try:
        from rjepa_latent import _core
    except Exception:  # noqa: BLE001
        return False
    return "emulated" in _core.build_info()["cuda_arch"]


def _run_emulated(builds, kind: str, timeout: int) -> str:
    exe = builds.get(kind)
    # RJEPA_EMU_ORDER=reverse: threads run in the opposite order to the
    # natural one between barriers, so a missing barrier changes results
    env = {**os.environ, "RJEPA_EMU_ORDER": os.environ.get("RJEPA_EMU_ORDER", "reverse")}
    env.pop("RJEPA_ATTN", None)
    if kind == "emu-sanitized":
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:" + env.get("ASAN_OPTIONS", "")
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    r = subprocess.run([str(exe), "cuda", *_seed_args()], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=env)
    _check_run(r, kind)
    assert "emulated device" not in r.stderr, r.stderr[-3000:]  # no emulator diagnostic
    return r.stdout


def test_emulated_cuda_ops(builds):
    out = _run_emulated(builds, "emu", 400)
    n = int(re.search(r"(\d+) cases", out).group(1))
    assert n >= 60, f"only {n} cases ran"
    ran = {ln.split()[1] for ln in out.splitlines() if ln.startswith("ok  ")}
    assert {"cuda-bf16", "cuda-f32", "cuda-bf16-fma"} <= ran, ran
    ops = {ln.split()[2] for ln in out.splitlines() if ln.startswith("ok  ")}
    assert "dequant" in ops, ops   # a device-only op: the weights kept quantized


def test_emulated_cuda_ops_sanitized(builds):
    _run_emulated(builds, "emu-sanitized", 600)


@pytest.mark.gpu
def test_cuda_ops(builds):
    if _emulated_core():
        pytest.skip("the installed core is the emulated device's: test_emulated_cuda_ops runs the "
                    "op test on it")
    if _have_device() is False:
        pytest.skip("no CUDA device")
    if _cuda_home() is None:
        pytest.skip("nvcc not found: the CUDA variant cannot be built")
    exe = builds.get("cuda")
    r = _run([str(exe), "cuda", *_seed_args()], 540)
    if r.returncode == SKIP_RC:
        pytest.skip(r.stdout.strip())
    _check_run(r, "cuda")

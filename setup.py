"""Build of rjepa_latent._core: the C engine (csrc/) plus, when CUDA is
available, the CUDA backend (kernels/*.cu) compiled by nvcc and linked in.

CUDA is looked for in $CUDA_HOME, then as `nvcc` on PATH. RJEPA_CUDA=0 forces
a CPU-only build, RJEPA_CUDA=1 makes a missing nvcc an error. RJEPA_CUDA=emu
builds the emulated device, for testing only: the same kernels/*.cu and CUDA
backend compiled by the host C++ compiler against kernels/emu (an emulated
CUDA runtime, block/warp execution and a CPU cuBLAS stand-in), so
device="cuda" runs on the CPU; it needs no CUDA toolkit. RJEPA_WERROR=1
(CI) turns compiler warnings into errors. cuBLAS is not linked: the CUDA
backend loads it at run time (kernels/cublas_loader.c), so the extension
imports on machines with the toolkit but no driver, GPU or cuBLAS.

The CPU GEMM is OpenBLAS from the scipy-openblas32 wheel when that imports at
build time. RJEPA_BLAS=builtin (or no scipy-openblas32) builds the plain-C
GEMM of csrc/gemm_builtin.c instead (RL_BLAS_BUILTIN; exact fp32, one
summation order) and links no BLAS; RJEPA_BLAS=openblas makes a missing
scipy-openblas32 an error.
"""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_ARCHS = ("80", "90", "90a")
EMU_ARCH = "emulated sm_90 on the CPU, for testing only"


def emulated() -> bool:
    return os.environ.get("RJEPA_CUDA", "").strip().lower() == "emu"


def nvcc_top(nvcc):
    """The toolkit root nvcc itself uses (its TOP), or None."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            top = Path(line.split("TOP=", 1)[1].strip().strip('"')).resolve()
            if (top / "include" / "cuda_runtime_api.h").exists():
                return str(top)
    return None


def find_cuda_home():
    """Directory of the CUDA toolkit, or None (CPU-only build)."""
    mode = os.environ.get("RJEPA_CUDA", "").strip()
    if mode == "0":
        print("rjepa_latent: RJEPA_CUDA=0: building the CPU-only engine (no CUDA backend)",
              file=sys.stderr)
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = shutil.which("nvcc")
        if nvcc:
            home = str(Path(nvcc).resolve().parent.parent)
            if not (Path(home) / "include" / "cuda_runtime_api.h").exists():
                home = nvcc_top(nvcc) or home  # nvcc on PATH may be a wrapper script
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    if mode == "1":
        sys.exit("RJEPA_CUDA=1 but no nvcc found (set CUDA_HOME or put nvcc on PATH)")
    print("rjepa_latent: no nvcc found; building the CPU-only engine "
          "(set CUDA_HOME or put nvcc on PATH to build the CUDA backend)", file=sys.stderr)
    return None


def openblas_paths():
    """(include dir, lib dir, library name) of scipy-openblas32, or None for
    the builtin C GEMM (RJEPA_BLAS=builtin, or the wheel is not installed)."""
    mode = os.environ.get("RJEPA_BLAS", "").strip().lower()
    if mode not in ("", "builtin", "openblas"):
        sys.exit(f"RJEPA_BLAS must be 'builtin' or 'openblas', got {mode!r}")
    if mode == "builtin":
        return None
    try:
        import scipy_openblas32 as ob
    except ImportError:
        if mode == "openblas":
            sys.exit("RJEPA_BLAS=openblas but scipy-openblas32 is not installed "
                     "(pip install scipy-openblas32)")
        print("rjepa_latent: scipy-openblas32 not found; building the builtin C GEMM "
              "(RJEPA_BLAS=builtin)", file=sys.stderr)
        return None
    return ob.get_include_dir(), ob.get_lib_dir(), ob.get_library()


class BuildExt(build_ext):
    """Compiles kernels/*.cu with nvcc first and links the objects in."""

    def build_extension(self, ext):
        # an extension built in another mode (emulated or not) in the same build
        # tree is never reused: its objects and .so are not up to date for this one
        mode_file = Path(self.build_temp) / "rjepa-cuda-mode"
        mode = "emu" if emulated() else "native"
        if not mode_file.exists() or mode_file.read_text() != mode:
            self.force = True
        werror = os.environ.get("RJEPA_WERROR") == "1"
        cuda_home = None if emulated() else find_cuda_home()
        # -ffp-contract=off: no fused multiply-adds the source did not write
        # (the builtin GEMM's bits must not depend on the target's FMA)
        ext.extra_compile_args = ["-O3", "-std=c11", "-fopenmp", "-ffp-contract=off", "-Wall",
                                  "-Wextra", "-Wno-unused-parameter",
                                  "-Wno-missing-field-initializers"]
        if werror:
            ext.extra_compile_args.append("-Werror")
        ext.extra_link_args = ["-fopenmp"]
        if emulated():
            print("rjepa_latent: RJEPA_CUDA=emu: building the emulated CUDA device (kernels/*.cu "
                  "and the CUDA backend on the CPU, for testing only)", file=sys.stderr)
            ext.extra_objects = list(ext.extra_objects or []) + self.compile_emulated(werror)
            ext.define_macros = list(ext.define_macros or []) + [
                ("RL_WITH_CUDA", "1"), ("RL_CUDA_EMULATED", "1"),
                ("RL_CUDA_ARCHS", '"' + EMU_ARCH + '"')]
            ext.include_dirs.insert(0, str(ROOT / "kernels" / "emu" / "include"))
            ext.extra_link_args += ["-lstdc++", "-lpthread"]
        elif cuda_home:
            print(f"rjepa_latent: CUDA toolkit found at {cuda_home}: compiling the CUDA backend "
                  f"(kernels/*.cu for {', '.join('sm_' + a for a in CUDA_ARCHS)}), which takes "
                  "much longer than the CPU engine alone (about a minute on 2 cores); to skip it, install with RJEPA_CUDA=0 "
                  "(e.g. RJEPA_CUDA=0 pip install .)", file=sys.stderr)
            objs = self.compile_cuda(cuda_home, werror)
            ext.extra_objects = list(ext.extra_objects or []) + objs
            ext.define_macros = list(ext.define_macros or []) + [
                ("RL_WITH_CUDA", "1"),
                ("RL_CUDA_ARCHS", '"' + ",".join("sm_" + a for a in CUDA_ARCHS) + '"')]
            ext.include_dirs.append(str(Path(cuda_home) / "include"))
            libdir = Path(cuda_home) / "lib64"
            if not libdir.exists():
                libdir = Path(cuda_home) / "lib"
            # the static runtime needs no libcudart.so at import; the driver
            # (libcuda) is opened by it lazily at the first CUDA call
            ext.extra_link_args += [str(libdir / "libcudart_static.a"), "-ldl", "-lrt",
                                    "-lpthread", "-lstdc++"]
        if ext.extra_objects:   # the kernels' objects: relink when only a kernel changed
            ext.depends = list(ext.depends or []) + [
                str(p) for d in ("kernels", "kernels/emu", "kernels/emu/include")
                for p in sorted((ROOT / d).glob("*")) if p.is_file()]
        super().build_extension(ext)
        mode_file.parent.mkdir(parents=True, exist_ok=True)
        mode_file.write_text(mode)

    def compile_emulated(self, werror, extra_flags=()):
        """kernels/*.cu (as C++) and kernels/emu/*.cpp with the host C++ compiler,
        two at a time; returns the objects."""
        cxx = os.environ.get("CXX", "g++")
        out_dir = Path(self.build_temp) / "kernels-emu"
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = emulated_cxx_flags(werror) + list(extra_flags)
        srcs = sorted((ROOT / "kernels").glob("*.cu")) + sorted((ROOT / "kernels" / "emu").glob("*.cpp"))
        cmds, objs = [], []
        for src in srcs:
            obj = out_dir / (src.stem + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            cmds.append([cxx, *lang, "-c", str(src), "-o", str(obj), *flags])
            objs.append(str(obj))
        with ThreadPoolExecutor(max_workers=2) as pool:
            for cmd, rc in zip(cmds, pool.map(lambda c: subprocess.call(c), cmds)):
                print(" ".join(cmd), file=sys.stderr)
                if rc != 0:
                    sys.exit("rjepa_latent: the emulated device build failed: " + " ".join(cmd))
        return objs

    def compile_cuda(self, cuda_home, werror):
        nvcc = str(Path(cuda_home) / "bin" / "nvcc")
        out_dir = Path(self.build_temp) / "kernels"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for a in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", "arch=compute_90,code=compute_90"]  # PTX for newer GPUs
        objs = []
        for src in sorted((ROOT / "kernels").glob("*.cu")):
            obj = out_dir / (src.stem + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "-I", str(ROOT / "csrc"), "--expt-relaxed-constexpr",
                   *gencode]
            if werror:
                cmd += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]
            cmd += ["-Xptxas", "-v"]  # registers, stack and spills of every kernel and arch
            print(" ".join(cmd), file=sys.stderr)
            r = subprocess.run(cmd, capture_output=True, text=True)
            log = out_dir / f"{src.stem}.ptxas.txt"
            log.write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                sys.stderr.write(r.stdout + r.stderr)
                raise subprocess.CalledProcessError(r.returncode, cmd)
            print(f"rjepa_latent: ptxas -v output of {src.name}: {log}", file=sys.stderr)
            for line in ptxas_spills(r.stdout + r.stderr):
                print(f"rjepa_latent: ptxas: {line}", file=sys.stderr)
            objs.append(str(obj))
        return objs


def ptxas_spills(text):
    """'kernel arch: N registers, S bytes spilled' for each kernel of a
    `ptxas -v` log that spills (demangled when c++filt is there)."""
    rows, entry = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
        if m:
            entry = [m.group(1), m.group(2), 0]
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and entry:
            entry[2] = int(m.group(1))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            if entry[2]:
                rows.append((entry[0], entry[1], int(m.group(1)), entry[2]))
            entry = None
    names = [r[0] for r in rows]
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if out.returncode == 0 and len(out.stdout.splitlines()) == len(names):
            names = [n.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
                     for n in out.stdout.splitlines()]
    return [f"{n} {arch}: {regs} registers, {spill} bytes spilled"
            for n, (_, arch, regs, spill) in zip(names, rows)]


def emulated_cxx_flags(werror: bool) -> list:
    """Host C++ flags of the emulated device's objects (also used by the op test)."""
    flags = ["-std=c++20", "-O2", "-fPIC", "-fopenmp", "-DRL_WITH_CUDA=1", "-DRL_CUDA_EMULATED=1",
             "-I", str(ROOT / "kernels" / "emu" / "include"), "-I", str(ROOT / "kernels" / "emu"),
             "-I", str(ROOT / "kernels"), "-I", str(ROOT / "csrc"), "-Wall", "-Wextra",
             "-Wno-unused-parameter", "-Wno-unknown-pragmas"]  # `#pragma unroll` is nvcc's
    if werror:
        flags.append("-Werror")
    return flags


def package_version() -> str:
    """The one place the version is written is pyproject.toml; the core gets it
    as RL_VERSION and rjepa_latent.__version__ reads it from the core, so a run's
    recorded package_version is always that of the engine that computed it."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        sys.exit("setup.py: no version = \"...\" line in pyproject.toml")
    return m.group(1)


def make_extension():
    import numpy as np
    blas = openblas_paths()
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.c"))
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION"),
              ("RL_VERSION", '"' + package_version() + '"')]
    if blas is None:
        return Extension("rjepa_latent._core", sources=sources,
                         include_dirs=[str(ROOT / "csrc"), np.get_include()],
                         define_macros=macros + [("RL_BLAS_BUILTIN", "1")])
    inc, libdir, lib = blas
    return Extension(
        "rjepa_latent._core",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), np.get_include(), inc],
        library_dirs=[libdir],
        libraries=[lib],
        runtime_library_dirs=[libdir],
        define_macros=macros,
    )


setup(ext_modules=[make_extension()], cmdclass={"build_ext": BuildExt})

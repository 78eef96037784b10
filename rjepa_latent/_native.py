"""Loads the compiled core.

A build with OpenBLAS (scipy-openblas32) links `libscipy_openblas.so` with an
rpath to where the wheel was at build time. When that no longer holds (the
package was installed elsewhere: a wheel, an editable install, a build tree)
the first import fails, and the library is then opened from the installed
wheel with RTLD_GLOBAL so that `_core` finds it. A build with the builtin C
GEMM (`build_info()["blas"] == "builtin C GEMM"`) links no BLAS, and
scipy_openblas32 is never imported for it."""
import ctypes
import os

# GNU OpenMP workers spin ~300k iterations after each parallel region. The
# engine alternates many short OpenMP regions with single-threaded work, and
# on a busy machine (the pipeline's tokenizer thread, other jobs) spinning
# threads starve the working one: measured 400 ms vs 4 ms per call of a tiny
# model at 2 threads under load, and no loss on an idle machine. libgomp reads
# this when _core loads it, so it must be set first; a user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "0")


def _load_core():
    try:
        from . import _core
        return _core
    except ImportError as exc:
        if "openblas" not in str(exc):
            raise
        first = exc
    try:
        import scipy_openblas32 as openblas
    except ImportError as exc:
        raise ImportError(f"rjepa_latent._core was built with OpenBLAS, which cannot be loaded "
                          f"({first}); install scipy-openblas32, or rebuild with "
                          f"RJEPA_BLAS=builtin") from exc
    path = os.path.join(openblas.get_lib_dir(), "lib" + openblas.get_library() + ".so")
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    from . import _core
    return _core


_core = _load_core()


def build_info() -> dict:
    """Version, BLAS ("scipy-openblas32 <config>" or "builtin C GEMM"),
    whether CUDA is compiled in and for which archs, OpenMP."""
    return dict(_core.build_info())


def cuda_emulated() -> bool:
    """True for a test build whose CUDA device is emulated on the CPU
    (RJEPA_CUDA=emu: the real kernels and backend, run by the host)."""
    return str(_core.build_info().get("cuda_arch", "")).startswith("emulated")

"""Loads the compiled core. OpenBLAS (from the scipy-openblas32 wheel) is
opened first with RTLD_GLOBAL so `_core` finds it wherever the package was
installed (wheel, editable install, build tree)."""
import ctypes
import os

import scipy_openblas32 as _openblas

# GNU OpenMP workers spin ~300k iterations after each parallel region. The
# engine alternates many short OpenMP regions with single-threaded work, and
# on a busy machine (the pipeline's tokenizer thread, other jobs) spinning
# threads starve the working one: measured 400 ms vs 4 ms per call of a tiny
# model at 2 threads under load, and no loss on an idle machine. libgomp reads
# this when _core loads it, so it must be set first; a user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "0")

_blas_path = os.path.join(_openblas.get_lib_dir(), "lib" + _openblas.get_library() + ".so")
ctypes.CDLL(_blas_path, mode=ctypes.RTLD_GLOBAL)

from . import _core  # noqa: E402  (must follow the preload)


def build_info() -> dict:
    """Version, BLAS, whether CUDA is compiled in and for which archs."""
    return dict(_core.build_info())

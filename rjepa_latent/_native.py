"""Loads the compiled core. OpenBLAS (from the scipy-openblas32 wheel) is
opened first with RTLD_GLOBAL so `_core` finds it wherever the package was
installed (wheel, editable install, build tree)."""
import ctypes
import os

import scipy_openblas32 as _openblas

_blas_path = os.path.join(_openblas.get_lib_dir(), "lib" + _openblas.get_library() + ".so")
ctypes.CDLL(_blas_path, mode=ctypes.RTLD_GLOBAL)

from . import _core  # noqa: E402  (must follow the preload)


def build_info() -> dict:
    """Version, BLAS, whether CUDA is compiled in and for which archs."""
    return dict(_core.build_info())

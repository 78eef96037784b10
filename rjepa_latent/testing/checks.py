"""`assert_latents_close`: compare latents and say where they differ."""
from __future__ import annotations

import numpy as np


def _as_float(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind == "V" or str(arr.dtype) == "bfloat16":   # ml_dtypes bfloat16
        arr = arr.astype(np.float32)
    if hasattr(x, "detach"):   # a torch tensor (bfloat16 included) without importing torch
        arr = np.asarray(x.detach().float().cpu().numpy())
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric latents, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def assert_latents_close(a, b, *, rtol: float, what: str = "") -> None:
    """Raise AssertionError unless `a` and `b` (arrays of latents: NumPy,
    bfloat16 views, torch tensors) have the same shape and
    max |a - b| <= rtol * max |b| (the relative error of docs/models.md, over
    the whole array). The message names `what`, both shapes or the worst
    element (its index, both values), the error and the bound, and, for
    arrays of 2 or more dimensions, the error along the first axis (a layer,
    a step...)."""
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and rtol >= 0):
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    label = f"{what}: " if what else ""
    x, y = _as_float(a, "a"), _as_float(b, "b")
    if x.shape != y.shape:
        raise AssertionError(f"{label}shapes differ: {x.shape} vs {y.shape}")
    if x.size == 0:
        return
    bad = ~np.isfinite(x) | ~np.isfinite(y)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{label}non-finite value at index {where}: {x[where]!r} vs {y[where]!r}")
    diff = np.abs(x - y)
    scale = float(np.abs(y).max())
    err = float(diff.max()) / scale if scale > 0 else float(diff.max())
    if err <= rtol:
        return
    where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
    msg = (f"{label}latents differ: max |a - b| / max |b| = {err:.3e} > rtol {rtol:.1e}; "
           f"worst at index {where}: {x[where]:.6g} vs {y[where]:.6g}")
    if x.ndim >= 2:
        per = diff.reshape(len(x), -1).max(1) / (scale if scale > 0 else 1.0)
        over = [i for i in range(len(per)) if per[i] > rtol]
        msg += (f"; along axis 0, {len(over)} of {len(per)} exceed it (first {over[:8]}), "
                f"error per index {np.array2string(per, precision=2, threshold=16)}")
    raise AssertionError(msg)

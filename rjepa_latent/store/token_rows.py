"""The keys of a per-token run's rows: each stored row's position in its
text, token id and L2 norm per layer (and, with outliers, its marks), the
tensors a shard holds for them, and the norm and outlier rules.

A row is an outlier in a layer (or site) when its norm exceeds K times the
median norm of that layer over the rows of its shard (before any is dropped). A shard's
rows depend only on the inputs and the configuration, so the marks never
depend on batching, workers or resumes.
"""
from __future__ import annotations

import numpy as np

# tensors of a keyed per-token shard, after token_offsets and token_steps
KEY_TENSORS = ("token_positions", "token_ids", "token_norms")
OUTLIER_TENSOR = "token_outliers"


def row_norms(lat: np.ndarray) -> np.ndarray:
    """float32 [n_layers, rows]: each row's L2 norm (accumulated in float64)."""
    x = np.asarray(lat, dtype=np.float32)
    return np.sqrt(np.einsum("lrd,lrd->lr", x, x, dtype=np.float64)).astype(np.float32)


def site_norms(sites: dict) -> np.ndarray:
    """float32 [n_sites, rows]: each row's L2 norm at each site of a run of
    sites (`sites`: name -> [rows, width], in the run's site order)."""
    return np.concatenate([row_norms(a if a.ndim == 3 else a[None]) for a in sites.values()])


def n_row_norms(config: dict) -> int:
    """How many norms a stored row has: one per layer, or one per site in a run
    of activation sites."""
    return len(config.get("sites") or config["layers"])


def outlier_marks(norms: np.ndarray, k: float) -> np.ndarray:
    """bool [n_layers, rows]: norm > k x the median norm of its layer (over `norms`' rows)."""
    if norms.size == 0:
        return np.zeros(norms.shape, dtype=bool)
    n = norms.astype(np.float64)
    return n > k * np.median(n, axis=1, keepdims=True)


def stored_f32(lat: np.ndarray, dtype: str) -> np.ndarray:
    """Stored latents (bf16 as uint16 bits) as float32."""
    if dtype == "bfloat16":
        return (np.asarray(lat).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(lat, dtype=np.float32)


def token_key_tensors(config: dict, items: list, token_rows: list[dict]) -> list[tuple[str, str, np.ndarray]]:
    """(name, safetensors dtype, array) of the row keys of a shard's items."""
    nl = n_row_norms(config)

    def cat(arrs, dtype, shape0):
        return np.concatenate(arrs, axis=-1).astype(dtype) if arrs else np.zeros(shape0, dtype)
    pos = cat([r["positions"] for r in token_rows], np.int32, (0,))
    ids = cat([np.asarray(it.ids)[r["positions"]] for it, r in zip(items, token_rows)], np.int32, (0,))
    norms = cat([r["norms"] for r in token_rows], np.float32, (nl, 0))
    out = [("token_positions", "I32", pos), ("token_ids", "I32", ids), ("token_norms", "F32", norms)]
    if "outliers" in config:
        out.append((OUTLIER_TENSOR, "I32", cat([r["outliers"] for r in token_rows], np.int32, (nl, 0))))
    return out


def token_key_layout(config: dict, rows: int) -> list[tuple[str, str, tuple]]:
    """The key tensors' (name, dtype, shape) in a keyed per-token shard of `rows` rows."""
    nl = n_row_norms(config)
    out = [("token_positions", "I32", (rows,)), ("token_ids", "I32", (rows,)),
           ("token_norms", "F32", (nl, rows))]
    if "outliers" in config:
        out.append((OUTLIER_TENSOR, "I32", (nl, rows)))   # 0/1; int32 keeps the latents 4-byte aligned
    return out

"""Random valid GGUF blocks of any supported GGML type, for test models.

gguf-py quantizes only some types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, ...); the
K-quants and IQ4 types are written here as random blocks instead: random
quant bytes and sub-block scales, with each float16 scale field (d, and the
min where the format has one) set so the block's largest dequantized value
is about `amplitude`. Every value is a finite, ordinary float, so a model
made of them runs like a randomly initialised one; what the weights are is
whatever gguf-py dequantizes them to.

`SCALE_OFFSETS` lists, per type, the byte offsets of a block's float16 scale
fields (a corrupt-file test overwrites one with inf or NaN).
"""
from __future__ import annotations

import numpy as np

# byte offsets of the float16 scales in one block (d first, then dmin / m)
SCALE_OFFSETS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}
BLOCK_TYPES = tuple(SCALE_OFFSETS)


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator,
                  amplitude: float = 0.1) -> np.ndarray:
    """uint8 [rows, bytes per row] of valid `type_name` blocks for a
    [rows, cols] matrix (cols a multiple of the type's block size)."""
    import gguf
    from gguf.quants import dequantize
    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{type_name} stores rows in blocks of {block} values: a row of {cols} "
                         f"values does not fit (use a multiple of {block})")
    n = rows * cols // block
    blocks = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    offsets = SCALE_OFFSETS[type_name]
    one = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    for off in offsets:
        blocks[:, off:off + 2] = one
    # every value is linear in the scales: scale them so the largest is ~amplitude
    peak = np.abs(dequantize(blocks, qtype).reshape(n, block)).max(axis=1)
    scale = amplitude * rng.uniform(0.5, 1.0, size=n) / np.where(peak > 0, peak, 1.0)
    scale16 = np.frombuffer(scale.astype(np.float16).tobytes(), dtype=np.uint8).reshape(n, 2)
    for off in offsets:
        blocks[:, off:off + 2] = scale16
    return blocks.reshape(rows, -1)

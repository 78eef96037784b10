"""`Model`: the user-facing engine (load a checkpoint on one device, get hidden
states / step-pooled latents as zero-copy NumPy arrays) and `memory_plan`.

Design choices:
- All argument validation happens here, with messages that name the argument
  and the offending value; the C core validates again (never trusts Python)
  but its messages are the last line of defence, not the user interface.
- The device contract of DESIGN.md: `device=None` picks cuda:0 when a CUDA
  device is visible, else the CPU with a one-line warning; an explicit CUDA
  request that cannot be met raises DeviceError, never falls back; on CUDA
  the bytes needed are compared with free memory before anything is
  allocated; after load every weight is verified to be device memory.
- `dtype` (storage of weights and GEMM operands): None means "bfloat16" on
  CUDA and "float32" on the CPU; "float32" on CUDA is the fp32 reference mode
  (no TF32); the CPU engine is fp32 only.
- `extract` packs sequences greedily, in input order, into batches under a
  token budget; per-sequence results are views into each batch's result
  array (the core-allocated owner stays alive through them: still zero-copy).
- `pooling="none"` is one [t, t+1) span per token with "first" pooling, the
  engine's single output path.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from . import _native  # noqa: F401  (preloads OpenBLAS before _core)
from . import _core
from .checkpoint import CheckpointSource, engine_config, load_hf, load_hf_config
from .checkpoint import resolve_max_layer
from .errors import DeviceError, DeviceMemoryError

POOLINGS = ("mean", "first", "last", "none")
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
MIN_AUTO_BATCH_TOKENS = 512   # below this a GPU batch is too small to be worth running
# headroom left free on a GPU for the CUDA context, cuBLAS workspace and the
# allocator's rounding (the plan itself is exact)
CUDA_HEADROOM_BYTES = 512 * 1024 * 1024
GiB = 1024 ** 3


# ---------------------------------------------------------------------------
# devices


def resolve_device(device: str | None) -> str:
    """"cpu" or "cuda:N" per the device contract (may warn or raise)."""
    if device is None:
        if _core.cuda_device_count() > 0:
            return "cuda:0"
        warnings.warn("rjepa_latent: no CUDA device visible; running on the CPU",
                      UserWarning, stacklevel=3)
        return "cpu"
    if not isinstance(device, str):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        _core.cuda_check_device(int(device[5:]))  # DeviceError with the reason
        return f"cuda:{int(device[5:])}"
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


DTYPES = ("float32", "bfloat16")


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The engine dtype for a resolved device: None -> the device's default."""
    if dtype is None:
        return "float32" if device == "cpu" else "bfloat16"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16' (or None), got {dtype!r}")
    if device == "cpu" and dtype != "float32":
        raise ValueError(f"dtype {dtype!r} is not available on device 'cpu' (the CPU engine "
                         f"computes in 'float32' only)")
    return dtype


def _open_source(path: str | os.PathLike, max_layer: int | None) -> CheckpointSource:
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        from .gguf_loader import load_gguf
        return load_gguf(path, max_layer)
    return load_hf(path, max_layer)


def _plan(eng_cfg: dict, device: str, max_batch_tokens: int, dtype: str) -> dict:
    weight, workspace = _core.plan_bytes(eng_cfg, device, int(max_batch_tokens), dtype=dtype)
    plan = {"device": device, "dtype": dtype, "max_batch_tokens": int(max_batch_tokens),
            "max_layer": eng_cfg["max_layer"], "weight_bytes": int(weight),
            "workspace_bytes": int(workspace), "total_bytes": int(weight) + int(workspace)}
    if device.startswith("cuda:"):
        free, total = _core.cuda_mem_info(int(device[5:]))
        plan.update(free_bytes=int(free), total_device_bytes=int(total))
    return plan


def _check_fits(plan: dict) -> None:
    need = plan["total_bytes"] + CUDA_HEADROOM_BYTES
    if need <= plan["free_bytes"]:
        return
    raise DeviceMemoryError(
        f"{plan['device']}: the model needs {need / GiB:.2f} GiB (weights "
        f"{plan['weight_bytes'] / GiB:.2f} GiB up to layer {plan['max_layer']}, workspace "
        f"{plan['workspace_bytes'] / GiB:.2f} GiB for max_batch_tokens="
        f"{plan['max_batch_tokens']}, {CUDA_HEADROOM_BYTES / GiB:.2f} GiB headroom) but only "
        f"{plan['free_bytes'] / GiB:.2f} GiB of {plan['total_device_bytes'] / GiB:.2f} GiB is "
        f"free; lower max_batch_tokens, or max_layer to load fewer layers, or free the GPU")


def _default_tokens(device: str, max_batch_tokens: int | None) -> int:
    if max_batch_tokens is None:
        return DEFAULT_MAX_BATCH_TOKENS["cpu" if device == "cpu" else "cuda"]
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, (int, np.integer)) \
            or max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    return int(max_batch_tokens)


def memory_plan(path: str | os.PathLike, device: str | None = None,
                max_batch_tokens: int | None = None,
                layers: Sequence[int] | None = None, dtype: str | None = None) -> dict:
    """Bytes a Model would allocate (weights of the layers needed for `layers`,
    default all, plus the workspace for `max_batch_tokens`), from the config
    only: no weights are read. On CUDA also `free_bytes`, `total_device_bytes`.
    `dtype` as for Model."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        src = _open_source(path, None)
        cfg = src.config
        src.close()
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        cfg, _ = load_hf_config(path)
    n = cfg["num_layers"]
    max_layer = n if layers is None else max(resolve_layers(layers, n, n))
    return _plan(engine_config(cfg, max_layer), device, _default_tokens(device, max_batch_tokens),
                 dtype)


# ---------------------------------------------------------------------------
# argument validation


def resolve_layers(layers: Iterable[int], num_layers: int, max_layer: int) -> list[int]:
    """HF hidden_states indices (negatives count from the end, -1 = L) -> absolute, in the
    given order; out of range or deeper than max_layer is a ValueError naming the index."""
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"layers must be ints, got {x!r}")
        v = int(x) + (num_layers + 1 if x < 0 else 0)
        if not 0 <= v <= num_layers:
            raise ValueError(f"layer index {x} is out of range: valid hidden-state indices are "
                             f"{-num_layers - 1}..{num_layers} (0 = embeddings, "
                             f"{num_layers} = final norm)")
        if v > max_layer:
            raise ValueError(f"layer index {x} (= {v}) is deeper than this model's max_layer="
                             f"{max_layer}; load the model with a larger max_layer")
        out.append(v)
    if not out:
        raise ValueError("layers is empty")
    return out


def _as_ids(seq: Any, i: int, vocab: int, name: str | None = None) -> np.ndarray:
    name = name or f"seqs[{i}]"
    arr = np.asarray(seq)
    if arr.dtype == object:
        raise TypeError(f"{name} is not a sequence of ints")
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            raise ValueError(f"{name} is empty")
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab))
    if bad.size:
        p = int(bad[0])
        raise ValueError(f"{name}[{p}] = {int(arr[p])} is not a token id (vocab_size={vocab})")
    return arr.astype(np.int32, copy=False)


def _as_spans(spans: Any, i: int, length: int) -> np.ndarray:
    name = f"spans[{i}]"
    arr = np.asarray(spans)
    if arr.size == 0:
        raise ValueError(f"{name} holds no span")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer [start, end) pairs, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2], got {arr.shape}")
    for j, (s, e) in enumerate(arr.tolist()):
        if not 0 <= s < e <= length:
            what = "is empty" if s == e else "is reversed" if s > e else "is out of range"
            raise ValueError(f"{name}[{j}] = [{s}, {e}) {what} (sequence {i} has {length} tokens)")
    return arr.astype(np.int32)


# ---------------------------------------------------------------------------
# the model


class Model:
    """A checkpoint loaded on one device. See the module docstring and README."""

    def __init__(self, path: str | os.PathLike, device: str | None = None,
                 max_layer: int | None = None, max_batch_tokens: int | None = None,
                 threads: int | None = None, dtype: str | None = None) -> None:
        self._engine = None
        self.device = resolve_device(device)
        self.dtype: str = resolve_dtype(dtype, self.device)
        self.max_batch_tokens = _default_tokens(self.device, max_batch_tokens)
        self._auto_batch_tokens = max_batch_tokens is None
        src = _open_source(path, max_layer)
        try:
            self._load(src, threads)
        finally:
            src.close()

    def _load(self, src: CheckpointSource, threads: int | None) -> None:
        self.config = dict(src.config)
        self.num_layers: int = self.config["num_layers"]
        self.hidden_size: int = self.config["hidden_size"]
        self.max_layer: int = src.engine_config["max_layer"]
        self.tokenizer = src.tokenizer
        self.fingerprint: str = src.fingerprint
        self.sliding_window: int | None = src.sliding_window
        if self.device != "cpu":
            plan = _plan(src.engine_config, self.device, self.max_batch_tokens, self.dtype)
            # left unset, max_batch_tokens is what fits: halve the default until it does
            while self._auto_batch_tokens and self.max_batch_tokens > MIN_AUTO_BATCH_TOKENS \
                    and plan["total_bytes"] + CUDA_HEADROOM_BYTES > plan["free_bytes"]:
                self.max_batch_tokens //= 2
                plan = _plan(src.engine_config, self.device, self.max_batch_tokens, self.dtype)
            _check_fits(plan)
        engine = _core.Engine(src.engine_config, self.device, int(threads or 0), dtype=self.dtype)
        for kind, layer, buf, dtype, shape in src.tensors():
            engine.set_tensor(kind, layer, buf, dtype, tuple(shape))
        engine.check_complete()
        engine.reserve(self.max_batch_tokens)
        engine.verify_resident()
        self._engine = engine

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Frees weights and workspace now, on any device; arrays already
        returned stay valid (each owns its own memory)."""
        if self._engine is not None:
            self._engine.close()
        self._engine = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _eng(self) -> Any:
        if self._engine is None:
            raise RuntimeError("this Model is closed")
        return self._engine

    def memory_report(self) -> dict:
        """device, weight_bytes, workspace_bytes, free_bytes, total_bytes."""
        return dict(self._eng().memory_report())

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c['model_type']}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"device={self.device!r}, dtype={self.dtype!r}, max_layer={self.max_layer})")

    # -- compute -----------------------------------------------------------

    def hidden_states(self, ids: Any, layers: Sequence[int] | None = None) -> np.ndarray:
        """float32 [n_layers, T, hidden] for one sequence; layers None = 0..max_layer."""
        if layers is None:
            layers = range(self.max_layer + 1)
        ids = _as_ids(ids, 0, self.config["vocab_size"], name="ids")  # messages name `ids`
        return self.extract([ids], None, layers, "none")[0]

    def extract(self, seqs: Sequence[Any], spans: Sequence[Any] | None = None,
                layers: Sequence[int] = (-2,), pooling: str = "mean",
                max_batch_tokens: int | None = None) -> list[np.ndarray]:
        """One float32 array per sequence: [n_layers, n_spans, hidden]
        (pooling "none": [n_layers, T, hidden]). spans[i] is [n_i, 2] of
        [start, end) token positions; None = one span over the sequence."""
        engine = self._eng()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        lays = np.asarray(resolve_layers(layers, self.num_layers, self.max_layer), np.int32)
        if isinstance(seqs, np.ndarray) and seqs.ndim == 1 and seqs.dtype.kind in "iuf":
            raise TypeError("seqs must be a list of sequences, not one 1-D array "
                            "(wrap it: [ids])")
        seqs = list(seqs)
        if not seqs:
            return []
        ids = [_as_ids(s, i, self.config["vocab_size"]) for i, s in enumerate(seqs)]
        self._check_window(ids)
        sp = self._spans(ids, spans, pooling)
        budget = self.max_batch_tokens if max_batch_tokens is None else \
            _default_tokens(self.device, max_batch_tokens)
        if self.device != "cpu":  # the CUDA workspace was sized (and checked) at load
            budget = min(budget, engine.max_tokens)
        mode = "first" if pooling == "none" else pooling
        out: list[np.ndarray] = []
        for batch in self._batches(ids, sp, budget):
            out.extend(self._run(engine, [ids[i] for i in batch], [sp[i] for i in batch],
                                 lays, mode))
        return out

    def _check_window(self, ids: list[np.ndarray]) -> None:
        w = self.sliding_window
        for i, a in enumerate(ids):
            if w is not None and a.size > w:
                raise ValueError(f"seqs[{i}] has {a.size} tokens, more than this model's "
                                 f"sliding_window={w}; sliding-window attention is not "
                                 f"supported, so sequences must fit in the window")

    def _spans(self, ids: list[np.ndarray], spans: Sequence[Any] | None,
               pooling: str) -> list[np.ndarray]:
        if pooling == "none":
            if spans is not None:
                raise ValueError("spans must be None with pooling='none'")
            return [np.stack([np.arange(a.size), np.arange(1, a.size + 1)], 1).astype(np.int32)
                    for a in ids]
        if spans is None:
            return [np.array([[0, a.size]], np.int32) for a in ids]
        spans = list(spans)
        if len(spans) != len(ids):
            raise ValueError(f"spans has {len(spans)} entries but seqs has {len(ids)}; "
                             f"give one [n, 2] array per sequence")
        return [_as_spans(s, i, a.size) for i, (s, a) in enumerate(zip(spans, ids))]

    def _batches(self, ids: list[np.ndarray], spans: list[np.ndarray],
                 budget: int) -> list[list[int]]:
        """Greedy packing in input order; a batch's cost is max(tokens, spans)
        (the workspace holds both per token). A sequence alone over the budget
        grows the workspace on the CPU and is refused on CUDA."""
        batches: list[list[int]] = []
        cur: list[int] = []
        tok = nsp = 0
        for i, (a, s) in enumerate(zip(ids, spans)):
            need = max(a.size, len(s))
            if need > budget:
                self._check_seq_budget(i, need, budget)
            if cur and max(tok + a.size, nsp + len(s)) > budget:
                batches.append(cur)
                cur, tok, nsp = [], 0, 0
            cur.append(i)
            tok += a.size
            nsp += len(s)
        if cur:
            batches.append(cur)
        return batches

    def _check_seq_budget(self, i: int, need: int, budget: int) -> None:
        """A sequence over the budget: fine on the CPU (_run grows the
        workspace), refused on CUDA (its workspace was sized and checked at load)."""
        if self.device != "cpu":
            raise ValueError(f"seqs[{i}] needs {need} tokens of workspace, more than "
                             f"max_batch_tokens={budget} reserved on {self.device}; load the "
                             f"Model with a larger max_batch_tokens")

    def _run(self, engine: Any, ids: list[np.ndarray], spans: list[np.ndarray],
             layers: np.ndarray, mode: str) -> list[np.ndarray]:
        tokens = np.concatenate(ids) if len(ids) > 1 else ids[0]
        cu = np.zeros(len(ids) + 1, np.int32)
        cu[1:] = np.cumsum([a.size for a in ids])
        sp = np.concatenate(spans) if len(spans) > 1 else spans[0]
        seq_of = np.repeat(np.arange(len(ids), dtype=np.int32), [len(s) for s in spans])
        need = max(tokens.size, sp.shape[0])
        if need > engine.max_tokens:  # only reached on the CPU (see _check_seq_budget)
            engine.reserve(need)
        res = engine.forward(np.ascontiguousarray(tokens, np.int32), cu, layers,
                             np.ascontiguousarray(sp, np.int32), seq_of, mode)
        if len(ids) == 1:
            return [res]
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in spans])])
        return [res[:, bounds[k]:bounds[k + 1], :] for k in range(len(ids))]

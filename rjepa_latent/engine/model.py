"""`Model`: the user-facing engine (load a checkpoint on one device, get hidden
states / step-pooled latents as zero-copy NumPy arrays) and `memory_plan`.

Design choices:
- The seam to the engine is three methods, and no forward pass reaches
  `_core` another way: `check` validates one sequence with its spans (the only place
  token ids, spans and the CUDA workspace limit are
  checked), `resolve_layers` validates layer indices, and `run_batch` runs
  exactly one engine call over sequences `check` accepted. Packing is
  `plan.plan_batches` (the one packer, one cost rule). `extract` is check ->
  plan -> run_batch; the pipeline does the same steps itself (it checks in
  its tokenizer thread, so a bad record becomes an error line, not an abort).
- Each kind of bad input has its own exception (errors.py: TokenIdError,
  SpanError, LayerError, SequenceLengthError, ...), all ValueErrors (the
  wrong-type variants also TypeErrors), with messages that name the argument
  and the offending value. The C core validates again (it never trusts
  Python) but its messages are the last line of defence.
- The device contract of docs/design.md: `device=None` picks cuda:0 when a
  CUDA device is visible (never the emulated device of a RJEPA_CUDA=emu test
  build: that one only when asked for), else the CPU with a one-line notice; an explicit
  CUDA request that cannot be met raises DeviceError, never falls back; on
  CUDA the bytes needed are compared with free memory before anything is
  allocated; after load every weight is verified to be device memory.
- `dtype` of a Model is the engine's compute dtype (storage of weights and
  GEMM operands): None means "bfloat16" on CUDA and "float32" on the CPU;
  "float32" on CUDA is the fp32 reference mode (no TF32); the CPU engine is
  fp32 only. (The `dtype` of `extract_dataset` is the stored dtype, another
  thing.)
- `weights="keep"` (the default for a checkpoint stored quantized) keeps the
  matrices and the embedding in their stored format in engine memory, each
  layer's dequantized into one reusable scratch just before its GEMMs;
  `"dequantize"` converts them to the compute dtype at load. On the CPU both
  give the same bits, and on CUDA too (its kernels decode GGUF blocks and
  the AWQ / GPTQ / FP8 layouts to the CPU's fp32 values, rounded once).
- `max_batch_tokens` is the batch budget; the engine's workspace is reserved
  for it at load. A call that needs more (one sequence longer than the budget,
  or a larger per-call budget) grows the CPU workspace for that call only and
  gives it back afterwards, so a call never changes the Model; on CUDA the
  workspace was sized and checked against free memory at load, so more is
  refused.
- Per-sequence results are views into each batch's result array (the
  core-allocated owner stays alive through them: still zero-copy).
- `pooling="none"` is one [t, t+1) span per token with "first" pooling, the
  engine's single output path.
- `pooling` is one name (results [n_layers, n_spans, hidden]) or a sequence
  of distinct span poolings (results [n_poolings, n_layers, n_spans, hidden]):
  the engine pools every span once per pooling after each requested layer,
  in the same forward, into one result array (`resolve_poolings`).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .. import _native  # noqa: F401  (preloads OpenBLAS before _core)
from .. import _core
from .._native import cuda_emulated
from ..checkpoints.checkpoint import CheckpointSource, engine_config, hidden_state_index
from ..checkpoints.loader import checkpoint_storage, open_checkpoint, read_config
from ..checkpoints.quantized import KEPT_DTYPE
from ..errors import (DeviceError, DeviceMemoryError, LayerError, LayerTypeError, SequenceError,
                      SequenceLengthError, SequenceTypeError, SpanError, SpanTypeError, TokenIdError)
from .plan import batch_cost, plan_batches
from .sites import Site, resolve_sites


# The one definition of the pooling names. A span pooling reduces each
# [start, end) span to one vector; "none" keeps every token (one [t, t+1) span
# per token). A run directory stores one or several span poolings, or "none".
SPAN_POOLINGS = ("mean", "first", "last", "max")
TOKEN_POOLING = "none"
POOLINGS = (*SPAN_POOLINGS, TOKEN_POOLING)
# compute dtypes of the engine (Model.dtype); not the stored dtypes (store.STORE_DTYPES)
ENGINE_DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
MIN_AUTO_BATCH_TOKENS = 512   # below this a GPU batch is too small to be worth running
# headroom left free on a GPU for the CUDA context, cuBLAS workspace and the
# allocator's rounding (the memory plan itself is exact)
CUDA_HEADROOM_BYTES = 512 * 1024 * 1024
MAX_WORKSPACE_TOKENS = 1 << 30  # the engine's reserve() limit
GiB = 1024 ** 3


def backend_of(device: str) -> str:
    """"cpu" or "cuda" for a resolved device string."""
    return "cpu" if device == "cpu" else "cuda"


# ---------------------------------------------------------------------------
# devices


def _parse_device(device: str | None) -> str:
    """"cpu" or "cuda:N" from the spelling alone (no device is needed)."""
    if device is None:   # an emulated device is a test tool: used only when asked for
        return "cuda:0" if _core.cuda_device_count() > 0 and not cuda_emulated() else "cpu"
    if not isinstance(device, str):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return f"cuda:{int(device[5:])}"
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# shown by `rjepa-latent extract` beside its summary when the default device fell
# back to the CPU (the Python API says nothing: `Model.device` tells)
CPU_NOTICE = "device: cpu (the default: no CUDA device is visible; --device cpu chooses it explicitly)"
EMULATED_DEFAULT_NOTICE = ("rjepa_latent: this build's CUDA device is emulated on the CPU (a test "
                           "build); running on the CPU engine (device='cuda' selects the emulated "
                           "device)")
EMULATED_NOTICE = ("rjepa_latent: {device} is an emulated CUDA device: the CUDA kernels run on "
                   "the CPU, for testing only (slow; not a GPU's speed or rounding)")
_cpu_notice_shown = False
_emulated_notice_shown = False


def resolve_device(device: str | None) -> str:
    """"cpu" or "cuda:N" per the device contract (may raise). Left to the default
    on a machine without a CUDA device it is "cpu" without a word (the CPU is the
    default there; `rjepa-latent extract` shows the choice in its summary); only
    a test build's emulated CUDA device gets a one-line notice on stderr, once
    per process (a notice, not a Python warning)."""
    global _cpu_notice_shown, _emulated_notice_shown
    resolved = _parse_device(device)
    if device is None and resolved == "cpu" and not _cpu_notice_shown:
        _cpu_notice_shown = True
        if _core.cuda_device_count() > 0 and cuda_emulated():
            print(EMULATED_DEFAULT_NOTICE, file=sys.stderr, flush=True)
    if resolved != "cpu":
        _core.cuda_check_device(int(resolved[5:]))  # DeviceError with the reason
        if cuda_emulated() and not _emulated_notice_shown:
            _emulated_notice_shown = True
            print(EMULATED_NOTICE.format(device=resolved), file=sys.stderr, flush=True)
    return resolved


def resolve_engine_dtype(dtype: str | None, device: str) -> str:
    """The engine's compute dtype for a resolved device: None -> the device's default."""
    if dtype is None:
        return "float32" if device == "cpu" else "bfloat16"
    if not isinstance(dtype, str) or dtype not in ENGINE_DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16' (or None), got {dtype!r}")
    if device == "cpu" and dtype != "float32":
        raise ValueError(f"dtype {dtype!r} is not available on device 'cpu' (the CPU engine "
                         f"computes in 'float32' only)")
    return dtype


# ---------------------------------------------------------------------------
# memory plans (bytes a Model would allocate; not the batch plan of plan.py)


def device_engine_config(eng_cfg: dict, device: str) -> tuple[dict, int | None]:
    """The engine config `device` runs and the longest sequence it then takes
    (None: any). A backend whose capabilities lack sliding-window attention
    runs the model with full attention, the same network on sequences that
    fit in the window, and longer ones are refused (Model.check); where the
    capabilities are unknown (CUDA not built in) the config is unchanged."""
    window = eng_cfg.get("sliding_window")
    if not window or not any(eng_cfg.get("layer_sliding", ())):
        return eng_cfg, None
    try:
        features = _core.backend_caps(device)["features"]
    except DeviceError:
        return eng_cfg, None
    if "sliding_window" in features:
        return eng_cfg, None
    return ({k: v for k, v in eng_cfg.items() if k not in ("sliding_window", "layer_sliding")},
            int(window))


def _plan_memory(eng_cfg: dict, device: str, max_batch_tokens: int, dtype: str,
                 kept: tuple[tuple[str, ...], int] = ((), 0)) -> dict:
    """Weight and workspace bytes from the config: arithmetic, no device needed.
    `kept`: (kinds kept quantized, their stored bytes): those count as stored
    plus one dequantization scratch instead of their dense size."""
    weight, workspace = _core.plan_bytes(eng_cfg, device, int(max_batch_tokens), dtype=dtype,
                                         keep=kept[0])
    weight += kept[1]
    return {"device": device, "dtype": dtype, "max_batch_tokens": int(max_batch_tokens),
            "max_layer": eng_cfg["max_layer"], "weight_bytes": int(weight),
            "workspace_bytes": int(workspace), "total_bytes": int(weight) + int(workspace)}


def _device_memory_info(device: str) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device that exists; None on the CPU or without one."""
    if device == "cpu":
        return None
    index = int(device[5:])
    if _core.cuda_device_count() <= index:
        return None
    free, total = _core.cuda_mem_info(index)
    return int(free), int(total)


def _largest_fitting_batch(eng_cfg: dict, device: str, dtype: str, available: int,
                           kept: tuple[tuple[str, ...], int] = ((), 0)) -> int:
    """The largest max_batch_tokens whose weights + workspace fit in `available`
    bytes (0: not even one token). plan_bytes grows with the token count."""
    def need(t: int) -> int:
        return sum(_core.plan_bytes(eng_cfg, device, t, dtype=dtype, keep=kept[0])) + kept[1]
    if need(1) > available:
        return 0
    lo, hi = 1, MAX_WORKSPACE_TOKENS
    if need(hi) <= available:
        return hi
    while hi - lo > 1:  # need(lo) fits, need(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= available else (lo, mid)
    return lo


def _check_fits(mem: dict) -> None:
    need = mem["total_bytes"] + CUDA_HEADROOM_BYTES
    if need <= mem["free_bytes"]:
        return
    raise DeviceMemoryError(
        f"{mem['device']}: the model needs {need / GiB:.2f} GiB (weights "
        f"{mem['weight_bytes'] / GiB:.2f} GiB up to layer {mem['max_layer']}, workspace "
        f"{mem['workspace_bytes'] / GiB:.2f} GiB for max_batch_tokens="
        f"{mem['max_batch_tokens']}, {CUDA_HEADROOM_BYTES / GiB:.2f} GiB headroom) but only "
        f"{mem['free_bytes'] / GiB:.2f} GiB of {mem['total_device_bytes'] / GiB:.2f} GiB is "
        f"free; lower max_batch_tokens, or max_layer to load fewer layers, or free the GPU")


def _check_batch_tokens(device: str, max_batch_tokens: int | None) -> int:
    """max_batch_tokens as given (a positive int), or the device's default."""
    if max_batch_tokens is None:
        return DEFAULT_MAX_BATCH_TOKENS[backend_of(device)]
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, (int, np.integer)) \
            or max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    return int(max_batch_tokens)


def memory_plan(path: str | os.PathLike, device: str | None = None,
                max_batch_tokens: int | None = None,
                layers: Sequence[int] | None = None, dtype: str | None = None,
                device_memory: int | None = None, weights: str | None = None) -> dict:
    """Bytes a Model would allocate (weights of the layers needed for `layers`,
    default all, plus the workspace for `max_batch_tokens`), from the config
    only: no weights are read and no device is needed, `device="cuda"` included.
    Where the CUDA device exists, also `free_bytes` and `total_device_bytes`.
    `device_memory` (bytes) plans for a device of that size (one you may not
    have); with it, or with a real device's free memory, `fits` and
    `max_fitting_batch_tokens` say whether this plan fits and the largest
    max_batch_tokens that would (headroom included on CUDA). `dtype` and
    `weights` as for Model: weights kept quantized count their stored bytes
    (`kept_bytes`) plus one dequantization scratch in weight_bytes."""
    device = _parse_device(device)
    dtype = resolve_engine_dtype(dtype, device)
    tokens = _check_batch_tokens(device, max_batch_tokens)
    if device_memory is not None and (isinstance(device_memory, bool) or
                                      not isinstance(device_memory, (int, np.integer)) or
                                      device_memory <= 0):
        raise ValueError(f"device_memory must be a positive int (bytes), got {device_memory!r}")
    cfg = read_config(path)
    n = cfg["num_layers"]
    max_layer = n if layers is None else max(resolve_layers(layers, n, n))
    eng_cfg, _ = device_engine_config(engine_config(cfg, max_layer), device)
    kept = checkpoint_storage(path, max_layer, weights)
    mem = _plan_memory(eng_cfg, device, tokens, dtype, kept)
    mem.update(weights="keep" if kept[0] else "dequantize", kept_bytes=kept[1])
    info = _device_memory_info(device)
    if info is not None:
        mem.update(free_bytes=info[0], total_device_bytes=info[1])
    available = int(device_memory) if device_memory is not None else \
        (info[0] if info is not None else None)
    if available is not None:
        headroom = 0 if device == "cpu" else CUDA_HEADROOM_BYTES
        if device_memory is not None:
            mem["device_memory"] = int(device_memory)
        mem.update(headroom_bytes=headroom, fits=mem["total_bytes"] + headroom <= available,
                   max_fitting_batch_tokens=_largest_fitting_batch(
                       eng_cfg, device, dtype, available - headroom, kept))
    return mem


# ---------------------------------------------------------------------------
# argument validation: the one place each rule is written


def resolve_layers(layers: Iterable[int], num_layers: int, max_layer: int) -> list[int]:
    """HF hidden_states indices (negatives count from the end, -1 = L) -> absolute, in the
    given order; out of range or deeper than max_layer is a LayerError naming the index."""
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise LayerTypeError(f"layers must be ints, got {x!r}")
        v = hidden_state_index(x, num_layers)
        if v > max_layer:
            raise LayerError(f"layer index {x} (= {v}) is deeper than this model's max_layer="
                             f"{max_layer}; load the model with a larger max_layer")
        out.append(v)
    if not out:
        raise LayerError("layers is empty")
    return out


def resolve_poolings(pooling: Any) -> tuple[tuple[str, ...], bool]:
    """(the pooling names, whether results get a leading poolings axis): one name
    (a str) -> ((name,), False); a sequence of distinct span poolings -> (names,
    True). "none" (every token) only alone. ValueError / TypeError naming the
    mistake."""
    if isinstance(pooling, str):
        names, many = (pooling,), False
    elif isinstance(pooling, (list, tuple)):
        names, many = tuple(pooling), True
    else:
        raise TypeError(f"pooling must be a str or a list / tuple of str, got {pooling!r}")
    if not names:
        raise ValueError("pooling is empty: give one of " + ", ".join(POOLINGS))
    for p in names:
        if not isinstance(p, str) or p not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {p!r}")
    dup = sorted({p for p in names if names.count(p) > 1})
    if dup:
        raise ValueError(f"pooling lists {', '.join(map(repr, dup))} more than once: {names!r}")
    if TOKEN_POOLING in names and len(names) > 1:
        raise ValueError(f"pooling {TOKEN_POOLING!r} (every token) cannot be combined with span "
                         f"poolings; got {names!r}")
    return names, many


def _as_ids(seq: Any, vocab: int, name: str) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.dtype == object:
        raise SequenceTypeError(f"{name} is not a sequence of ints")
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            raise SequenceError(f"{name} is empty")
        raise SequenceTypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise SequenceError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise SequenceError(f"{name} is empty")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab))
    if bad.size:
        p = int(bad[0])
        raise TokenIdError(f"{name}[{p}] = {int(arr[p])} is not a token id (vocab_size={vocab})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _as_spans(spans: Any, name: str, length: int, seq_name: str) -> np.ndarray:
    arr = np.asarray(spans)
    if arr.size == 0:
        raise SpanError(f"{name} holds no span")
    if arr.dtype.kind not in "iu":
        raise SpanTypeError(f"{name} must hold integer [start, end) pairs, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise SpanError(f"{name} must have shape [n, 2], got {arr.shape}")
    for j, (s, e) in enumerate(arr.tolist()):
        if not 0 <= s < e <= length:
            what = "is empty" if s == e else "is reversed" if s > e else "is out of range"
            raise SpanError(f"{name}[{j}] = [{s}, {e}) {what} ({seq_name} has {length} tokens)")
    return np.ascontiguousarray(arr, dtype=np.int32)


@dataclass(frozen=True, eq=False)
class Checked:
    """One sequence that `Model.check` accepted: int32 token ids [T], int32
    spans [S, 2] ([t, t+1) per token when `per_token`, for pooling "none")."""
    ids: np.ndarray
    spans: np.ndarray
    per_token: bool
    model: "Model" = field(repr=False)

    @property
    def cost(self) -> int:
        return batch_cost(self.ids.size, self.spans.shape[0])


# ---------------------------------------------------------------------------
# the model


class Model:
    """A checkpoint loaded on one device. See the module docstring and docs/api.md."""

    def __init__(self, path: str | os.PathLike, device: str | None = None,
                 max_layer: int | None = None, max_batch_tokens: int | None = None,
                 threads: int | None = None, dtype: str | None = None,
                 weights: str | None = None) -> None:
        self._engine = None
        self.path: str = os.fspath(path)   # the checkpoint (its chat template, tokenizer files)
        self.device = resolve_device(device)
        self.backend = backend_of(self.device)
        self.dtype: str = resolve_engine_dtype(dtype, self.device)  # compute dtype
        self.max_batch_tokens = _check_batch_tokens(self.device, max_batch_tokens)
        self._auto_batch_tokens = max_batch_tokens is None
        src = open_checkpoint(path, max_layer, weights)
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
        self.fingerprint: str = src.fingerprint   # the weights' bytes join it once they are read
        self.sliding_window: int | None = src.sliding_window
        # a device without windowed attention takes sequences up to the window only
        eng_cfg, self._window_limit = device_engine_config(src.engine_config, self.device)
        # kinds kept quantized ("keep") and their stored bytes; none: "dequantize"
        kept = (tuple(getattr(src, "keep", ())), int(getattr(src, "stored_bytes", 0)))
        self.weights: str = "keep" if kept[0] else "dequantize"
        if self.device != "cpu":
            def fitted() -> dict:
                mem = _plan_memory(eng_cfg, self.device, self.max_batch_tokens,
                                   self.dtype, kept)
                free, total = _core.cuda_mem_info(int(self.device[5:]))
                return {**mem, "free_bytes": int(free), "total_device_bytes": int(total)}
            mem = fitted()
            # left unset, max_batch_tokens is what fits: halve the default until it does
            while self._auto_batch_tokens and self.max_batch_tokens > MIN_AUTO_BATCH_TOKENS \
                    and mem["total_bytes"] + CUDA_HEADROOM_BYTES > mem["free_bytes"]:
                self.max_batch_tokens //= 2
                mem = fitted()
            _check_fits(mem)
        engine = _core.Engine(eng_cfg, self.device, int(threads or 0), dtype=self.dtype,
                              keep=kept[0])
        # load-time dequantization runs on the model's threads, as its forward does
        for kind, layer, buf, dtype, shape in src.tensors(engine.threads if self.device == "cpu"
                                                          else int(threads or 0)):
            if dtype == KEPT_DTYPE:
                buf.hand_to(engine, kind, layer, shape)
            else:
                engine.set_tensor(kind, layer, buf, dtype, tuple(shape))
        engine.check_complete()
        self.fingerprint = src.final_fingerprint()
        engine.reserve(self.max_batch_tokens)
        engine.verify_resident()
        # what decides the result bits besides the weights (BLAS build and core type
        # on the CPU; "sm_XY K SMs cuBLAS N attention mma|fma" on CUDA): part of a run's identity
        self.kernel: str = engine.kernel
        self._engine = engine

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Frees the weights and the workspace now, on any device; arrays already
        returned stay valid (each owns its own memory). Closing twice is harmless."""
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

    @property
    def workspace_tokens(self) -> int:
        """Tokens the engine's workspace holds now (max_batch_tokens outside a call)."""
        return int(self._eng().max_tokens)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c['model_type']}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"device={self.device!r}, dtype={self.dtype!r}, max_layer={self.max_layer})")

    # -- the seam: check, resolve_layers, run_batch ----------------------------

    def check(self, ids: Any, spans: Any = None, *, per_token: bool = False, name: str = "ids",
              spans_name: str = "spans") -> Checked:
        """Validate one sequence for this model: token ids (integers, 1-D, not
        empty, in the vocabulary), its length (on CUDA the reserved
        workspace, and the sliding window where the device lacks windowed
        attention) and its spans ([n, 2] integer [start, end) inside
        the sequence; None = one span over it; `per_token`: one per token, for
        pooling "none", and `spans` must be None). Raises the InputError
        subclass of the mistake, naming `name` / `spans_name`. Thread-safe (reads
        no engine state), so a pipeline may check in another thread."""
        arr = _as_ids(ids, self.config["vocab_size"], name)
        n = arr.size
        if self._window_limit is not None and n > self._window_limit:
            raise SequenceLengthError(
                f"{name} has {n} tokens, more than this model's sliding_window="
                f"{self._window_limit}; {self.device} has no sliding-window attention, so "
                "sequences must fit in the window there (the CPU runs longer ones)")
        if per_token:
            if spans is not None:
                raise SpanError("spans must be None with pooling='none'")
            sp = np.stack([np.arange(n), np.arange(1, n + 1)], 1).astype(np.int32)
        elif spans is None:
            sp = np.array([[0, n]], np.int32)
        else:
            sp = _as_spans(spans, spans_name, n, name)
        cost = batch_cost(n, sp.shape[0])
        if self.device != "cpu" and cost > self.max_batch_tokens:
            raise SequenceLengthError(
                f"{name} needs {cost} tokens of workspace ({n} tokens, {sp.shape[0]} spans), "
                f"more than max_batch_tokens={self.max_batch_tokens} reserved on {self.device}; "
                f"load the Model with a larger max_batch_tokens")
        return Checked(arr, sp, per_token, self)

    def resolve_layers(self, layers: Iterable[int]) -> list[int]:
        """Absolute hidden-state indices of `layers` for this model (LayerError if bad)."""
        return resolve_layers(layers, self.num_layers, self.max_layer)

    def resolve_sites(self, sites: Iterable[str] | str) -> list[Site]:
        """The Sites of these names for this model (LayerError naming the valid forms)."""
        return resolve_sites(sites, self.num_layers, self.max_layer)

    def run_batch(self, batch: Sequence[Checked], layers: Iterable[int],
                  pooling: str | Sequence[str] = "mean",
                  sites: Iterable[str] | None = None) -> list:
        """One engine call over exactly these checked sequences (a planned batch):
        one float32 array per sequence, [n_layers, n_spans, hidden] (a sequence of
        poolings: [n_poolings, n_layers, n_spans, hidden], all from one forward). A
        batch larger than the workspace grows it for this call on the CPU; on CUDA
        it is refused. With `sites` (`layers` is then ignored) one dict per
        sequence instead: canonical site name -> [n_spans, width] (a sequence of
        poolings: [n_poolings, n_spans, width]), zero-copy views of one result."""
        engine = self._eng()
        names, many = resolve_poolings(pooling)
        per_token = names == (TOKEN_POOLING,)
        mode: Any = ["first" if per_token else p for p in names] if many else \
            ("first" if per_token else names[0])
        site_list = self.resolve_sites(sites) if sites is not None else None
        lays = np.asarray([s.code for s in site_list] if site_list is not None else
                          self.resolve_layers(layers), np.int32)
        if not batch:
            return []
        for c in batch:
            if not isinstance(c, Checked) or c.model is not self:
                raise TypeError("run_batch takes sequences this Model's check() returned")
            if c.per_token != per_token:
                raise ValueError(f"a sequence checked with per_token={c.per_token} cannot run "
                                 f"with pooling={pooling!r}")
        tokens = np.concatenate([c.ids for c in batch]) if len(batch) > 1 else batch[0].ids
        spans = np.concatenate([c.spans for c in batch]) if len(batch) > 1 else batch[0].spans
        cu = np.zeros(len(batch) + 1, np.int32)
        cu[1:] = np.cumsum([c.ids.size for c in batch])
        counts = [c.spans.shape[0] for c in batch]
        seq_of = np.repeat(np.arange(len(batch), dtype=np.int32), counts)
        with self.workspace_for(batch_cost(tokens.size, spans.shape[0])):
            res = engine.forward(tokens, cu, lays, spans, seq_of, mode)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        if site_list is not None:
            return _split_sites(res, site_list, self.config, len(names), many, bounds)
        if len(batch) == 1:
            return [res]
        return [res[..., bounds[k]:bounds[k + 1], :] for k in range(len(batch))]

    @contextlib.contextmanager
    def workspace_for(self, max_batch_tokens: int) -> Iterator[None]:
        """Inside the block the workspace holds batches of cost `max_batch_tokens`:
        on the CPU grown if needed and given back at the end (the Model is left as
        it was); on CUDA (sized against free memory at load) more is a ValueError."""
        engine = self._eng()
        have = int(engine.max_tokens)
        need = int(max_batch_tokens)
        if need <= have:
            yield
            return
        if self.device != "cpu":
            raise ValueError(f"a batch of {need} tokens of workspace is more than the {have} "
                             f"reserved on {self.device}; use max_batch_tokens <= {have}, or "
                             f"load the Model with a larger max_batch_tokens")
        try:
            engine.reserve(need)  # frees the old workspace first
        except BaseException:
            engine.reserve(have)  # so a failed growth leaves the Model as it was
            raise
        try:
            yield
        finally:
            engine.reserve(have)

    # -- compute -----------------------------------------------------------

    def activations(self, token_ids: Any, sites: Iterable[str] | str) -> dict[str, np.ndarray]:
        """Every token's activations at `sites` (TransformerLens names, engine/sites.py)
        for one sequence: canonical site name -> float32 [T, width], zero-copy
        views of one result; one forward, run no deeper than the deepest site."""
        self._eng()
        return self.run_batch([self.check(token_ids, per_token=True, name="token_ids")], (),
                              TOKEN_POOLING, sites=sites)[0]

    def hidden_states(self, ids: Any, layers: Sequence[int] | None = None) -> np.ndarray:
        """float32 [n_layers, T, hidden] for one sequence; layers None = 0..max_layer."""
        if layers is None:
            layers = range(self.max_layer + 1)
        self._eng()
        return self.run_batch([self.check(ids, per_token=True, name="ids")], layers,
                              TOKEN_POOLING)[0]

    def extract(self, seqs: Sequence[Any], spans: Sequence[Any] | None = None,
                layers: Sequence[int] = (-2,), pooling: str | Sequence[str] = "mean",
                max_batch_tokens: int | None = None,
                sites: Sequence[str] | None = None) -> list:
        """One float32 array per sequence: [n_layers, n_spans, hidden]
        (pooling "none": [n_layers, T, hidden]); `pooling` a sequence of span
        poolings, e.g. ("mean", "max", "last"): [n_poolings, n_layers, n_spans,
        hidden], every pooling from the same forward. spans[i] is [n_i, 2] of
        [start, end) token positions; None = one span over the sequence.
        Sequences are packed in input order by plan.plan_batches under
        `max_batch_tokens` (default: the Model's). With `sites` (activation
        sites by name, `layers` then unused) one dict per sequence: canonical
        site name -> [n_spans, width] ([n_poolings, n_spans, width])."""
        self._eng()
        names, _ = resolve_poolings(pooling)
        if sites is not None:
            self.resolve_sites(sites)
        else:
            self.resolve_layers(layers)
        if isinstance(seqs, np.ndarray) and seqs.ndim == 1 and seqs.dtype.kind in "iuf":
            raise SequenceTypeError("seqs must be a list of sequences, not one 1-D array "
                                    "(wrap it: [ids])")
        seqs = list(seqs)
        if not seqs:
            return []
        per_token = names == (TOKEN_POOLING,)
        if per_token and spans is not None:
            raise SpanError("spans must be None with pooling='none'")
        if spans is not None:
            spans = list(spans)
            if len(spans) != len(seqs):
                raise SpanError(f"spans has {len(spans)} entries but seqs has {len(seqs)}; "
                                f"give one [n, 2] array per sequence")
        checked = [self.check(s, None if spans is None else spans[i], per_token=per_token,
                              name=f"seqs[{i}]", spans_name=f"spans[{i}]")
                   for i, s in enumerate(seqs)]
        budget = self.max_batch_tokens if max_batch_tokens is None else \
            _check_batch_tokens(self.device, max_batch_tokens)
        batches = plan_batches([c.ids.size for c in checked], budget,
                               [c.spans.shape[0] for c in checked], longest_first=False)
        out: list[np.ndarray] = [None] * len(checked)  # type: ignore[list-item]
        largest = max(batch_cost(sum(checked[i].ids.size for i in b),
                                 sum(checked[i].spans.shape[0] for i in b)) for b in batches)
        with self.workspace_for(largest):  # grown at most once per call (CPU)
            for b in batches:
                for i, r in zip(b, self.run_batch([checked[i] for i in b], layers, pooling,
                                                  sites=sites)):
                    out[i] = r
        return out


def _split_sites(flat: np.ndarray, sites: list[Site], config: dict, n_poolings: int, many: bool,
                 bounds: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per-sequence dicts of views into one flat result laid out per pooling,
    per site [S, width] (csrc/sites.h)."""
    S = int(bounds[-1])
    widths = [s.width(config) for s in sites]
    per_pool = flat.reshape(n_poolings, S * sum(widths))
    out: list[dict[str, np.ndarray]] = [{} for _ in range(len(bounds) - 1)]
    col = 0
    for site, w in zip(sites, widths):
        block = per_pool[:, S * col:S * (col + w)].reshape(n_poolings, S, w)
        col += w
        for k in range(len(out)):
            v = block[:, bounds[k]:bounds[k + 1], :]
            out[k][site.name] = v if many else v[0]
    return out

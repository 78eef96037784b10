"""`check_parity` and `rjepa-latent parity`: this engine against HF
transformers on the user's own model, device and dtype.

What one check does, in order:
1. Texts: the package's sample problems (default), the first N records of a
   data file through the same segmentation as `extract`, or the caller's.
2. Spans: each record is tokenized by the model's tokenizer and its step
   spans are recomputed here token by token from the offsets (the span rule
   of docs/design.md, written independently of `tokenize.step_spans`); the
   two must agree.
3. This engine: the hidden states of every requested layer for each text
   alone, its pooled step latents alone, and the same texts packed into one
   batch (batch invariance: bitwise on the CPU, bounded on CUDA). Then the
   model is closed, so two copies of the weights are never in memory at once.
4. HF transformers (fp32, eager attention, TF32 off): the same texts one at
   a time with `output_hidden_states`; with a bf16 engine also HF's own bf16
   run, whose error sets the bound. Only the layers up to the deepest
   requested one are loaded when that is below the last layer.
5. Per layer: the worst relative error over the texts, ||ours - ref|| /
   ||ref||, of the hidden states and of the pooled step latents, the bound
   that applies, PASS or FAIL.

Bounds: the CPU engine (fp32) 1e-5 (1e-4 for GGUF files, whose weights HF
dequantizes through its own code path); the CUDA engine in fp32 mode 1e-4;
the CUDA engine in bf16 at most 1.1x HF's own bf16 error against the same
fp32 reference (docs/parity.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np


CPU_BOUND = 1e-5
GGUF_BOUND = 1e-4
CUDA_FP32_BOUND = 1e-4
BF16_SLACK = 1.1          # ours may be at most this times HF's own bf16 error
BF16_FLOOR = 1e-7
DEFAULT_TEXTS = 8
INSTALL_HINT = ('the parity check runs HF transformers as the reference: '
                'pip install "torch" "transformers>=4.56" (and "accelerate" for GGUF files)')


@dataclass
class LayerParity:
    """One hidden-state index: worst relative errors over the texts."""
    layer: int
    worst_rel_err: float          # hidden states
    pooled_rel_err: float         # pooled step latents
    bound: float
    passed: bool
    hf_bf16_rel_err: float | None = None   # HF's own bf16 error (bf16 engines only)


@dataclass
class ParityResult:
    model: str
    device: str
    dtype: str
    pooling: str
    texts: int
    tokens: int
    reference: str                 # what the reference was and where it ran
    layers: list[LayerParity]
    batch_invariance: dict         # {"passed", "max_abs_diff", "bound", "rule"}
    spans: dict                    # {"passed", "checked", "problems"}
    notes: list[str] = field(default_factory=list)
    emulated_device: bool = False  # the CUDA device of a test build, emulated on the CPU

    @property
    def passed(self) -> bool:
        return (all(lp.passed for lp in self.layers) and self.batch_invariance["passed"]
                and self.spans["passed"])

    @property
    def failed_layers(self) -> list[int]:
        return [lp.layer for lp in self.layers if not lp.passed]

    def to_json(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        bf16 = any(lp.hf_bf16_rel_err is not None for lp in self.layers)
        head = f"{'layer':>5}  {'hidden rel err':>14}  {'pooled rel err':>14}  "
        head += f"{'HF bf16 err':>11}  " if bf16 else ""
        where = self.device + (" emulated on the CPU" if self.emulated_device else "")
        lines = [f"parity of {self.model} on {where} ({self.dtype}) against {self.reference}",
                 f"{self.texts} texts, {self.tokens} tokens, pooling {self.pooling}", "",
                 head + f"{'bound':>9}  result"]
        for lp in self.layers:
            row = f"{lp.layer:>5}  {lp.worst_rel_err:>14.3e}  {lp.pooled_rel_err:>14.3e}  "
            if bf16:
                row += f"{lp.hf_bf16_rel_err:>11.3e}  "
            lines.append(row + f"{lp.bound:>9.2e}  {'PASS' if lp.passed else 'FAIL'}")
        b = self.batch_invariance
        lines.append("")
        lines.append(f"batch invariance ({b['rule']}): max |packed - alone| = {b['max_abs_diff']:.3e}"
                     f"  {'PASS' if b['passed'] else 'FAIL'}")
        s = self.spans
        lines.append(f"step spans (span rule, {s['checked']} steps): "
                     f"{'PASS' if s['passed'] else 'FAIL: ' + '; '.join(s['problems'][:3])}")
        lines.extend(f"note: {n}" for n in self.notes)
        verdict = "PASSED" if self.passed else (
            "FAILED" + (f" at layer {', '.join(map(str, self.failed_layers))}"
                        if self.failed_layers else ""))
        lines.append(verdict)
        return "\n".join(lines)


# ------------------------------------------------------------------ inputs

def _records(texts: Sequence[Any] | None, data: str | os.PathLike | None, n: int) -> list:
    """Records (text + step character ranges) through the project's own segmentation."""
    from ..inputs.data import Record, Template, read_records
    from ..inputs.segment import DEFAULT_STEP_REGEX
    if texts is not None and data is not None:
        raise ValueError("give texts or data, not both")
    if texts is not None:
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty")
        if all(isinstance(t, str) for t in texts):   # each text is one step
            for i, t in enumerate(texts):
                if not t.strip():
                    raise ValueError(f"texts[{i}] is empty")
            return [Record(i, f"text-{i}", t, [(0, len(t))], {}, "<texts>", i + 1)
                    for i, t in enumerate(texts)]
        if not all(isinstance(t, dict) for t in texts):
            raise TypeError("texts must be all strings (one step each) or all record dicts "
                            "({'question': ..., 'steps': [...]}, as in a data file)")
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:   # the same reader as a data file
            p = Path(tmp) / "texts.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in texts), encoding="utf-8")
            out = list(read_records([p], "auto", Template(), DEFAULT_STEP_REGEX))
        bad = [r for r in out if not isinstance(r, Record)]
        if bad:
            raise ValueError(f"texts[{bad[0].index}]: {bad[0].reason}")
        return out
    if data is None:
        from .demo import SAMPLES_DIR
        data = sorted(SAMPLES_DIR.glob("*.jsonl"))[0]
    good = []
    for r in read_records([Path(data)], "auto", Template(), DEFAULT_STEP_REGEX):
        if isinstance(r, Record):
            good.append(r)
            if len(good) >= n:
                break
    if not good:
        raise ValueError(f"{data}: no usable record among its first lines (see `rjepa-latent extract`)")
    return good


def independent_spans(offsets: np.ndarray, steps: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """The span rule, token by token: a token belongs to the first step whose
    character range its (non-empty) offset range overlaps. None if a step has
    no token."""
    owner = []
    for a, b in offsets.tolist():
        k = next((j for j, (s, e) in enumerate(steps) if a < b and a < e and b > s), -1)
        owner.append(k)
    spans = []
    for j in range(len(steps)):
        mine = [t for t, k in enumerate(owner) if k == j]
        if not mine:
            return None
        spans.append((mine[0], mine[-1] + 1))
    return spans


def _check_spans(tok, records: list, items: list) -> dict:
    problems, checked = [], 0
    by_index = {it.index: it for it in items}
    for rec in records:
        enc = tok.encode(rec.text)
        expect = independent_spans(np.asarray(enc.offsets, np.int64).reshape(-1, 2), rec.steps)
        it = by_index.get(rec.index)
        if expect is None:
            if it is not None:
                problems.append(f"{rec.id}: a step has no token, but the record was not refused")
            continue
        if it is None:
            problems.append(f"{rec.id}: refused, but every step has tokens")
            continue
        got = [tuple(s) for s in it.spans.tolist()]
        checked += len(got)
        if got != expect:
            problems.append(f"{rec.id}: spans {got} != span rule {expect}")
    return {"passed": not problems, "checked": checked, "problems": problems}


# ------------------------------------------------------------------ the two engines

def _pool(states: np.ndarray, spans: np.ndarray, pooling: str) -> np.ndarray:
    """[n_layers, T, d] -> [n_layers, n_spans, d] float64 (the exact pooling of the reference)."""
    rows = []
    for s, e in spans.tolist():
        seg = states[:, s:e].astype(np.float64)
        rows.append(seg.mean(1) if pooling == "mean" else seg[:, 0] if pooling == "first" else seg[:, -1])
    return np.stack(rows, 1)


def _rel(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per layer (axis 0): ||ours - ref|| / ||ref||."""
    diff = np.linalg.norm((ours.astype(np.float64) - ref).reshape(len(ref), -1), axis=1)
    return diff / np.maximum(np.linalg.norm(ref.astype(np.float64).reshape(len(ref), -1), axis=1),
                             1e-30)


def _ours(model, items: list, layers: list[int], pooling: str) -> tuple[list, list, dict]:
    hidden = [model.hidden_states(it.ids, layers=layers) for it in items]
    pooled = [model.extract([it.ids], [it.spans], layers=layers, pooling=pooling)[0] for it in items]
    packed = model.extract([it.ids for it in items], [it.spans for it in items], layers=layers,
                           pooling=pooling)
    packed_h = model.extract([it.ids for it in items], None, layers=layers, pooling="none")
    diff = max([float(np.abs(p - a).max()) for p, a in zip(packed, pooled)] +
               [float(np.abs(p - a).max()) for p, a in zip(packed_h, hidden)])
    return hidden, pooled, {"max_abs_diff": diff}


def _import_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return torch


def _available_bytes(torch, where: str) -> int:
    if where.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(where))
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def load_reference(path: str, torch, dtype, where: str, n_layers: int | None):
    """HF transformers' model of `path` (a directory or a GGUF file) in `dtype`
    on `where`, keeping only the first `n_layers` decoder layers when given."""
    import transformers as T
    kw: dict = {"dtype": dtype, "attn_implementation": "eager" if dtype == torch.float32 else "sdpa"}
    src = path
    if path.lower().endswith(".gguf"):
        kw["gguf_file"] = os.path.basename(path)
        src = os.path.dirname(os.path.abspath(path))
    if n_layers is not None:
        cfg = T.AutoConfig.from_pretrained(src, **({"gguf_file": kw["gguf_file"]} if "gguf_file" in kw else {}))
        cfg.num_hidden_layers = n_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:n_layers]
        kw["config"] = cfg
    with _quiet_transformers(T):
        model = T.AutoModelForCausalLM.from_pretrained(src, **kw)
    return model.to(where).eval()


def load_reference_from_weights(path: str, torch, dtype, where: str, n_layers: int | None):
    """HF transformers' model class filled with the weights as this package
    reads them (dequantized GGUF tensors, HF names from the family's registry
    unit) and its RoPE frequencies. For GGUF files transformers' own loader
    cannot read (e.g. Qwen3 with head_dim != hidden/heads): the comparison then
    checks the forward pass, not the reading of the file."""
    import transformers as T
    from ..checkpoints import arch
    from ..checkpoints.loader import open_checkpoint
    src = open_checkpoint(path, None if n_layers is None else n_layers, weights="dequantize")
    try:
        c = src.config
        family = arch.for_model_type(c["model_type"], path)
        kwargs = {"hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
                  "num_hidden_layers": n_layers or c["num_layers"], "num_attention_heads": c["num_heads"],
                  "num_key_value_heads": c["num_kv_heads"], "head_dim": c["head_dim"],
                  "vocab_size": c["vocab_size"], "rms_norm_eps": c["rms_norm_eps"],
                  "rope_theta": c["rope_theta"], "tie_word_embeddings": True,
                  "max_position_embeddings": c.get("max_position_embeddings") or 4096,
                  "attention_bias": bool(c["attn_o_bias"]), "mlp_bias": bool(c["mlp_bias"])}
        flags = family.hf_flags(kwargs)
        if any(bool(flags[f]) != bool(c[f]) for f in arch.FLAGS):
            raise ValueError(f"{path}: its flags cannot be expressed as a transformers config")
        # Gemma / OLMo-2 files: their variants (and Gemma's stored 1 + w) are not
        # rebuilt here; transformers' own GGUF loader is their reference
        stated = sorted(k for k in arch.VARIANTS if k in c)
        if stated:
            raise ValueError(f"{path}: a {c['model_type']} file ({', '.join(stated)}) cannot be "
                             "rebuilt as a transformers model from its weights")
        cfg = T.AutoConfig.for_model(family.hf_model_types[0], **kwargs)
        cfg._attn_implementation = "eager" if dtype == torch.float32 else "sdpa"
        with _quiet_transformers(T):
            model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        state, inv_freq = {}, None
        for kind, layer, buf, _, shape in src.tensors():
            t = torch.from_numpy(np.array(buf, dtype=np.float32).reshape(shape))  # a copy: buf is reused
            if kind == "rope_inv_freq":
                inv_freq = t
            else:
                state[family.hf_name(kind, layer)] = t
        missing, unexpected = model.load_state_dict(state, strict=False)
        unused = [k for k in missing if not k.startswith("lm_head") and k != "model.norm.weight"]
        if unexpected or unused:
            raise ValueError(f"{path}: weights do not fit transformers' model: missing {unused[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("inv_freq"):
                    buffer.copy_(inv_freq)
    finally:
        src.close()
    return model.to(dtype=dtype, device=where).eval()


class _quiet_transformers:
    """transformers without its progress bars and 'weights not used' notes
    (expected when only the first layers are loaded)."""

    def __init__(self, T):
        self.T = T

    def __enter__(self):
        import logging
        self.level = self.T.logging.get_verbosity()
        self.bars = self.T.utils.logging.is_progress_bar_enabled()
        self.T.logging.set_verbosity(logging.ERROR)
        self.T.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.T.logging.set_verbosity(self.level)
        if self.bars:
            self.T.utils.logging.enable_progress_bar()


def _f32_copy(buf, dtype: str, shape) -> np.ndarray:
    """A feed item (buffer of float32, float16 or bfloat16) as a float32 array
    of its own (the feed reuses its buffers)."""
    raw = np.frombuffer(buf, {"float32": np.float32, "float16": np.float16,
                              "bfloat16": np.uint16}[dtype])
    if dtype == "bfloat16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32).reshape(shape)


def load_reference_dequantized(path: str, torch, dtype, where: str, n_layers: int | None):
    """A quantized HF directory (AWQ, GPTQ, FP8): transformers' model of its
    config.json (quantization_config dropped) holding the weights as this
    package dequantizes them, in fp32, and the rest of the checkpoint as is."""
    import transformers as T
    from ..checkpoints import arch
    from ..checkpoints.loader import open_checkpoint
    cfg = T.AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if n_layers is not None:
        cfg.num_hidden_layers = n_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:n_layers]
    cfg._attn_implementation = "eager" if dtype == torch.float32 else "sdpa"
    with _quiet_transformers(T):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = open_checkpoint(path, n_layers, weights="dequantize")
    try:
        family = arch.for_model_type(src.config["model_type"], path)
        state = {family.hf_name(kind, layer): torch.from_numpy(_f32_copy(buf, dt, shape))
                 for kind, layer, buf, dt, shape in src.tensors() if kind not in family.COMPUTED}
    finally:
        src.close()
    missing, unexpected = model.load_state_dict(state, strict=False)
    unused = [k for k in missing if not k.startswith("lm_head") and k != "model.norm.weight"]
    if unexpected or unused:
        raise ValueError(f"{path}: weights do not fit transformers' model: missing {unused[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model.to(dtype=dtype, device=where).eval()


def _reference(path: str, torch, dtype, where: str, n_layers: int | None, notes: list[str]):
    """transformers reading the file itself; for a GGUF file it cannot read,
    transformers' model class on this package's reading of the weights; for
    a quantized HF directory, transformers' model on the dequantized weights."""
    from ..checkpoints import hf_quantized
    if os.path.isdir(path) and hf_quantized.read_scheme(path) is not None:
        note = ("a quantized checkpoint: the reference is transformers' model holding the "
                "weights as rjepa_latent dequantizes them (fp32)")
        if note not in notes:
            notes.append(note)
        return load_reference_dequantized(path, torch, dtype, where, n_layers)
    try:
        return load_reference(path, torch, dtype, where, n_layers)
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
        # what transformers' GGUF loader raises for an architecture or shape it
        # does not map; memory exhaustion is not that, and is never papered over
        oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", ())
        if not path.lower().endswith(".gguf") or isinstance(e, oom) or "out of memory" in str(e).lower():
            raise
        note = (f"transformers cannot read this GGUF file ({type(e).__name__}: {str(e)[:120]}); "
                "the reference is transformers' model class on the weights as rjepa_latent reads them")
        if note not in notes:
            notes.append(note)
        return load_reference_from_weights(path, torch, dtype, where, n_layers)


def _hf_states(model, torch, items: list, layers: list[int], where: str) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for it in items:
            ids = torch.tensor(np.asarray(it.ids, np.int64)[None], device=where)
            hs = model.model(ids, output_hidden_states=True).hidden_states
            out.append(np.stack([hs[k][0].float().cpu().numpy() for k in layers]))
    return out


# ------------------------------------------------------------------ the check

def check_parity(model_path: str | os.PathLike, device: str | None = "cpu", dtype: str | None = None,
                 texts: Sequence[Any] | None = None, data: str | os.PathLike | None = None,
                 n_texts: int = DEFAULT_TEXTS, layers: Sequence[int] | None = None,
                 pooling: str = "mean", threads: int | None = None) -> ParityResult:
    """Compare this engine with HF transformers on `model_path`.

    `texts`: strings (each one step) or record dicts (`question`/`steps`, ...);
    default: the first `n_texts` records of `data`, or of the package's sample
    problems. `layers`: hidden-state indices (default all). Returns a
    ParityResult (`.passed`, `.layers`, `.table()`, `.to_json()`).
    """
    from .._native import cuda_emulated
    from ..engine.model import Model, resolve_layers
    from ..inputs.tokenize import prepare_tokenizer, tokenize_records
    torch = _import_torch()   # before any work: a missing reference is a clear error at once
    path = os.fspath(model_path)
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts <= 0:
        raise ValueError(f"n_texts must be a positive int, got {n_texts!r}")
    if pooling not in ("mean", "first", "last"):
        raise ValueError(f"pooling must be mean, first or last, got {pooling!r}")
    records = _records(texts, data, n_texts)
    notes: list[str] = []

    from ..checkpoints.loader import read_config
    cfg = read_config(path)
    n_layers = cfg["num_layers"]
    lays = resolve_layers(range(n_layers + 1) if layers is None else layers, n_layers, n_layers)
    # only the layers up to the deepest requested one are loaded, here and in HF below
    m = Model(path, device=device, dtype=dtype, threads=threads, max_layer=max(lays))
    try:
        tok = prepare_tokenizer(m.tokenizer)
        items = [t for t in tokenize_records(tok, records, None) if hasattr(t, "ids")]
        spans = _check_spans(tok, records, items)
        if not items:
            raise ValueError("no text could be tokenized into steps: " + "; ".join(spans["problems"][:3]))
        hidden, pooled, batch = _ours(m, items, lays, pooling)
        dev, eng_dtype, num_layers = m.device, m.dtype, m.num_layers
        weight_bytes = m.memory_report()["weight_bytes"]
    finally:
        m.close()
    notes.append("this engine ran first and was closed before HF loaded (one model in memory at a time)")

    on_cuda = dev.startswith("cuda")
    # HF runs on the engine's GPU when torch can use it; the emulated device of
    # a test build is the CPU, and its reference runs there (bounds stay CUDA's)
    emulated = on_cuda and cuda_emulated()
    torch_on_device = on_cuda and not emulated and torch.cuda.is_available()
    where = dev if torch_on_device else "cpu"
    if emulated:
        notes.append(f"{dev} is an emulated CUDA device (a test build: the CUDA kernels and "
                     "backend run on the CPU); HF ran on the CPU, the bounds are the CUDA engine's")
    elif on_cuda and not torch_on_device:
        notes.append(f"torch cannot use {dev} (a CPU-only torch?): HF ran on the CPU, the bounds "
                     "are the CUDA engine's")
    if torch_on_device:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    deepest = max(lays)
    keep = deepest + 1 if deepest < num_layers else None
    if keep is not None:
        notes.append(f"decoder layers 0..{keep - 1} only were loaded in HF, 0..{deepest - 1} in this "
                     f"engine (the deepest requested layer is {deepest})")
    # HF in fp32 holds what this engine held (in fp32), one more decoder layer,
    # and an LM head this engine never loads
    elem = 4 if eng_dtype == "float32" else 2
    per_layer = (weight_bytes - cfg["vocab_size"] * cfg["hidden_size"] * elem) // max(deepest, 1)
    need = (weight_bytes + per_layer) * 4 // elem + cfg["vocab_size"] * cfg["hidden_size"] * 4
    avail = _available_bytes(torch, where)
    if torch_on_device and need > avail:
        where = "cpu"
        avail = _available_bytes(torch, where)
        notes.append(f"HF fp32 does not fit on {dev}: the fp32 reference ran on the CPU")
    if need > avail:
        raise MemoryError(f"the HF fp32 reference needs about {need / 2**30:.1f} GiB but only "
                          f"{avail / 2**30:.1f} GiB is available; check fewer layers (--layers) "
                          "so fewer decoder layers are loaded")
    ref_model = _reference(path, torch, torch.float32, where, keep, notes)
    ref = _hf_states(ref_model, torch, items, lays, where)
    del ref_model
    hf16 = None
    if eng_dtype == "bfloat16":
        where16 = dev if torch_on_device else "cpu"
        m16 = _reference(path, torch, torch.bfloat16, where16, keep, notes)
        hf16 = _hf_states(m16, torch, items, lays, where16)
        del m16
    if torch_on_device:
        torch.cuda.empty_cache()

    gguf = path.lower().endswith(".gguf")
    fixed = CPU_BOUND if not on_cuda else CUDA_FP32_BOUND
    if gguf:
        fixed = max(fixed, GGUF_BOUND)
    e_hid = np.max([_rel(o, r) for o, r in zip(hidden, ref)], axis=0)
    e_pool = np.max([_rel(o, _pool(r, it.spans, pooling)) for o, r, it in zip(pooled, ref, items)], axis=0)
    e16 = None if hf16 is None else np.max([_rel(h, r) for h, r in zip(hf16, ref)], axis=0)
    if hf16 is not None:
        # HF bf16's own error pooled as ours is: a mean of bf16-rounded rows can
        # be further from the reference's mean than any row (layer 0: the embeddings)
        e16 = np.maximum(e16, np.max([_rel(_pool(h, it.spans, pooling), _pool(r, it.spans, pooling))
                                      for h, r, it in zip(hf16, ref, items)], axis=0))
    rows = []
    for j, k in enumerate(lays):
        bound = fixed if e16 is None else BF16_SLACK * float(e16[j]) + BF16_FLOOR
        ok = bool(e_hid[j] <= bound and e_pool[j] <= bound)
        rows.append(LayerParity(k, float(e_hid[j]), float(e_pool[j]), bound, ok,
                                None if e16 is None else float(e16[j])))
    if on_cuda:
        noise = float(np.max([np.abs(o - r).max() for o, r in zip(hidden, ref)]))
        batch.update(bound=2 * noise + 1e-6, rule="within twice the engine's own error on CUDA")
    else:
        batch.update(bound=0.0, rule="bitwise on the CPU")
    batch["passed"] = batch["max_abs_diff"] <= batch["bound"]
    reference = (f"HF transformers fp32 (eager attention) on {where}"
                 + (", GGUF dequantized by transformers" if gguf else ""))
    if eng_dtype == "bfloat16":
        reference += f"; HF bf16 on {where16} sets the bound"
    return ParityResult(str(path), dev, eng_dtype, pooling, len(items),
                        int(sum(len(it.ids) for it in items)), reference, rows, batch, spans, notes,
                        emulated_device=emulated)


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..run.cli import _layers_arg
    if hasattr(p, "_negative_number_matcher"):   # `--layers -2,-1` is a value
        import re
        p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")
    p.add_argument("--model", help="HF checkpoint directory or .gguf file (default: the default model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="engine compute dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--data", default=None, help="a .jsonl/.json data file (default: the sample problems)")
    p.add_argument("--texts", type=int, default=DEFAULT_TEXTS, help=f"how many records (default {DEFAULT_TEXTS})")
    p.add_argument("--layers", type=_layers_arg, default=None,
                   help="comma-separated hidden-state indices (default: all)")
    p.add_argument("--pooling", default="mean", choices=["mean", "first", "last"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads of this engine")
    p.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON here")


def run(args: argparse.Namespace) -> int:
    from ..errors import DeviceError, ModelFormatError
    model = args.model
    try:
        if model is None:
            from ..checkpoints.default_model import default_model_path
            model = default_model_path()
        result = check_parity(model, device=args.device, dtype=args.dtype, data=args.data,
                              n_texts=args.texts, layers=args.layers, pooling=args.pooling,
                              threads=args.threads)
    except ImportError as e:
        print(f"rjepa-latent parity: error: {e}", file=sys.stderr)
        return 2
    except (ModelFormatError, DeviceError, ValueError, TypeError, OSError, MemoryError) as e:
        print(f"rjepa-latent parity: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    return 0 if result.passed else 1

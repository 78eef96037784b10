"""The run spec: `run_spec` checks the options once (a picklable `RunSpec`),
`run_config` adds what the model decides (fingerprint, tokenizer, engine
identity), and the auto shard size."""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..engine.model import Model, TOKEN_POOLING, resolve_poolings
from ..inputs.data import (Chat, DEFAULT_STEP_SEPARATOR, DEFAULT_TEMPLATE, ErrorRecord, FORMATS, Record,
                           Template, read_records)
from ..inputs.segment import DEFAULT_STEP_REGEX, Segmenter
from ..inputs.select import check_selection
from ..inputs.sources import dataset_fingerprint, input_sources, is_dataset
from ..inputs.tokenize import prepare_tokenizer, tokenizer_hash
from ..store.files import STORE_DTYPES


AUTO = "auto"                # shard_size: chosen from the data and the device (auto_shard_size)


DEFAULT_SHARD_SIZE = AUTO


def parse_part(part: Any) -> tuple[int, int]:
    """'i/n' or (i, n) -> (i, n) with 0 <= i < n."""
    if isinstance(part, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"part must look like i/n (e.g. 0/4), got {part!r}")
        part = (int(m.group(1)), int(m.group(2)))
    i, n = part
    if n <= 0 or not 0 <= i < n:
        raise ValueError(f"part must be i/n with 0 <= i < n, got {i}/{n}")
    return int(i), int(n)


def input_fingerprint(paths: Sequence[Path]) -> list[dict]:
    """Name, size and sha256 of each input file (the dataset's identity)."""
    out = []
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist or is not a file")
        try:  # the name goes into UTF-8 JSON files (manifest, shard metadata)
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"input file name {p.name!r} is not valid UTF-8; rename the file") from None
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out.append({"name": p.name, "bytes": p.stat().st_size, "sha256": h.hexdigest()})
    return out


@dataclass(frozen=True)
class RunSpec:
    """Every validated option of one extraction run except the model (picklable:
    it travels to `--part` workers and Ray actors). Built by `run_spec`, the one
    place options are checked; `run_config(spec, m)` adds what the model decides.
    `inputs` are paths (str) or one `datasets.Dataset`; `fingerprint` their
    identity; `model_path` only locates a chat template (`chat`)."""
    inputs: Any
    fingerprint: tuple
    format: str = "auto"
    layers: tuple = (-2,)
    pooling: Any = "mean"           # a name, or a tuple of names
    sites: tuple | None = None      # activation sites by name (then layers is empty)
    dtype: str = "float32"          # the stored dtype
    template: str = DEFAULT_TEMPLATE
    step_separator: str = DEFAULT_STEP_SEPARATOR
    step_regex: str = DEFAULT_STEP_REGEX
    segment: str = "auto"
    strip_annotations: bool = False
    chat: bool = False
    chat_think: bool = False
    system: str | None = None
    model_path: str | None = None
    max_tokens: int | None = None
    max_batch_tokens: int | None = None
    shard_size: Any = AUTO          # records per shard, or "auto"
    limit: int | None = None
    ids: tuple | None = None        # the --ids sample, in file order
    part: tuple = (0, 1)
    allow_kernel_change: bool = False
    repair: bool = False
    tokens: str = "all"             # which tokens are kept (inputs/select.py)
    drop_bos: bool = False
    outliers: float | None = None   # K: rows over K x the shard's median norm are outliers
    drop_outliers: bool = False

    @property
    def pooling_value(self) -> str | list[str]:
        """The pooling as the configuration stores it: a name, or a list of names."""
        return self.pooling if isinstance(self.pooling, str) else list(self.pooling)

    def reading(self) -> dict:
        """How records become texts: the segmenter, annotation stripping, the chat template."""
        return {"segment": Segmenter(self.segment, self.step_regex), "strip": self.strip_annotations,
                "chat": _chat(self.model_path, self.chat_think, self.system) if self.chat else None}

    def records(self) -> Iterator[Record | ErrorRecord]:
        """The inputs' records, read lazily, in order."""
        r = self.reading()
        return read_records(self.inputs, self.format, Template(self.template, self.step_separator),
                            self.step_regex, segment=r["segment"], strip_annotations=r["strip"],
                            chat=r["chat"])


@functools.lru_cache(maxsize=4)
def _chat(model_path: str | None, think: bool, system: str | None) -> Chat:
    if model_path is None:
        raise ValueError("chat needs the model's path (its chat template); give a checkpoint path "
                         "or a Model loaded from one")
    return Chat.for_model(model_path, think, system)


def _positive(name: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def read_ids(path: str | os.PathLike) -> tuple[str, ...]:
    """An --ids file: one id per line (blank lines skipped, each line's outer
    whitespace dropped), UTF-8; a repeated id is kept once."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise FileNotFoundError(f"--ids file {str(p)!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--ids file {str(p)!r} is not UTF-8 text (one id per line)") from None
    ids = tuple(dict.fromkeys(x.strip() for x in text.split("\n") if x.strip()))
    if not ids:
        raise ValueError(f"--ids file {str(p)!r} holds no id (one id per line)")
    return ids


def run_spec(inputs: Any, *, format: str = "auto", layers: Sequence[int] | None = None,
             pooling: str | Sequence[str] = "mean", dtype: str = "float32", template: str | None = None,
             step_separator: str = DEFAULT_STEP_SEPARATOR, step_regex: str = DEFAULT_STEP_REGEX,
             max_tokens: int | None = None, max_batch_tokens: int | None = None,
             shard_size: int | str = AUTO, limit: int | None = None,
             ids: str | os.PathLike | Sequence[str] | None = None, part: Any = (0, 1),
             allow_kernel_change: bool = False, segment: str = "auto", strip_annotations: bool = False,
             chat: bool = False, chat_think: bool = False, system: str | None = None,
             repair: bool = False, model: Any = None, tokens: str = "all", drop_bos: bool = False,
             outliers: float | None = None, drop_outliers: bool = False,
             sites: Sequence[str] | None = None) -> RunSpec:
    """Check every option of `extract_dataset` (except the model itself; `model`,
    a path or a Model, only locates a chat template) and return the RunSpec.
    Missing or unreadable inputs, a bad option, a model without a usable chat
    template with `chat`: refused here, before any model is loaded or anything written."""
    dataset = inputs if is_dataset(inputs) else None
    paths = None if dataset is not None else \
        [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if paths is not None and not paths:
        raise ValueError("inputs is empty: give at least one .jsonl, .json or .parquet file")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    layers, sites = _layers_or_sites(layers, sites)
    names, _ = resolve_poolings(pooling)   # ValueError / TypeError naming the mistake
    pooling = names[0] if len(names) == 1 else tuple(names)   # one name is stored as a str
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if shard_size != AUTO:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
            raise ValueError(f"shard_size must be a positive int or 'auto', got {shard_size!r}")
    for name, v in (("max_tokens", max_tokens), ("max_batch_tokens", max_batch_tokens), ("limit", limit)):
        _positive(name, v)
    part = parse_part(part)
    check_selection(tokens, drop_bos, outliers, drop_outliers)
    if outliers is not None and tuple(names) != (TOKEN_POOLING,):
        raise ValueError("outliers (--outliers) marks rows of per-token output: it needs pooling='none'")
    if repair and part[1] != 1:
        raise ValueError("repair runs as a single run (part 0/1, the default), after every --part "
                         "worker stopped: it checks and redoes shards of all parts")
    chat = bool(chat or chat_think)
    if chat and template is not None:
        raise ValueError("template and chat exclude each other: with chat the model's chat template "
                         "builds the text")
    if system is not None and not chat:
        raise ValueError("system needs chat=True (--chat): it is a message of the chat template")
    tmpl = Template(template if template is not None else DEFAULT_TEMPLATE, step_separator)
    Segmenter(segment, step_regex)
    if ids is not None and not isinstance(ids, (str, os.PathLike)):
        ids = tuple(dict.fromkeys(str(x) for x in ids))
        if not ids:
            raise ValueError("ids is empty: give the ids of the records to extract")
    elif ids is not None:
        ids = read_ids(ids)
    source = dataset if dataset is not None else paths
    input_sources(source)  # missing files, unreadable Parquet: refused now
    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = os.fspath(model)
    elif isinstance(model, Model):
        model_path = model.path
    if chat:   # refused before the model is loaded
        _chat(model_path, bool(chat_think), system)
    fingerprint = [dataset_fingerprint(dataset)] if dataset is not None else input_fingerprint(paths)
    return RunSpec(
        inputs=dataset if dataset is not None else tuple(str(p) for p in paths),
        fingerprint=tuple(fingerprint), format=format, layers=tuple(int(x) for x in layers),
        pooling=pooling, sites=sites, dtype=dtype, template=tmpl.template, step_separator=step_separator,
        step_regex=step_regex, segment=segment, strip_annotations=bool(strip_annotations), chat=chat,
        chat_think=bool(chat_think), system=system, model_path=model_path, max_tokens=max_tokens,
        max_batch_tokens=max_batch_tokens, shard_size=shard_size, limit=limit, ids=ids, part=part,
        allow_kernel_change=bool(allow_kernel_change), repair=bool(repair), tokens=tokens,
        drop_bos=drop_bos, outliers=None if outliers is None else float(outliers),
        drop_outliers=bool(drop_outliers))


def _layers_or_sites(layers: Sequence[int] | None, sites: Sequence[str] | str | None
                     ) -> tuple[Sequence[int], tuple | None]:
    """(layers, sites) of a run: hidden states of layers (default -2) or activation
    sites by name, not both (a site's block is checked against the model later)."""
    if sites is None:
        return ((-2,) if layers is None else layers), None
    if layers is not None and len(layers):
        raise ValueError("give layers or sites, not both: a run stores hidden states of layers "
                         "or activation sites (blocks.{b}.hook_resid_post is hidden state b + 1)")
    from ..engine.sites import resolve_sites
    names = [sites] if isinstance(sites, str) else list(sites)
    resolve_sites(names, 1 << 30)   # the forms now; the blocks against the model's depth later
    return (), tuple(names)


def run_outputs(spec: RunSpec, m: Model) -> dict:
    """The configuration fields of what a run stores: its layers, and for a run of
    sites their canonical names and widths (absent otherwise)."""
    if not spec.sites:
        return {"layers": m.resolve_layers(spec.layers)}
    sites = m.resolve_sites(spec.sites)
    return {"layers": [], "sites": [s.name for s in sites],
            "site_widths": [s.width(m.config) for s in sites]}


def batch_budget(spec: RunSpec, m: Model) -> int:
    """The run's batch budget on `m` (a CUDA model's workspace is fixed at load)."""
    budget = spec.max_batch_tokens or m.max_batch_tokens
    if m.backend != "cpu" and budget > m.max_batch_tokens:
        raise ValueError(f"max_batch_tokens={budget} is more than the {m.max_batch_tokens} tokens "
                         f"of workspace this Model reserved on {m.device}; load the Model with "
                         f"max_batch_tokens={budget}, or pass a smaller one")
    return budget


def _selection_config(spec: RunSpec) -> dict:
    """Token selection in the configuration: always for a per-token run (its
    shards then hold each row's position, token id and norm), for a pooled run
    only when not the default (its configuration stays as it was)."""
    per_token = spec.pooling == TOKEN_POOLING
    if not per_token and spec.tokens == "all" and not spec.drop_bos:
        return {}
    out = {"token_selection": {"tokens": spec.tokens, "drop_bos": spec.drop_bos}}
    if spec.outliers is not None:
        out["outliers"] = {"k": spec.outliers, "drop": spec.drop_outliers}
    return out


def run_tokenizer(spec: RunSpec, m: Model):
    tok = prepare_tokenizer(m.tokenizer)
    return _TemplateTokens(tok) if spec.chat else tok


def run_config(spec: RunSpec, m: Model) -> dict:
    """The run's configuration (what identifies its bytes, engine identity
    included) from a spec and a loaded model; `shard_size` "auto" is resolved
    here (`auto_shard_size`); a resumed run keeps its stored one instead."""
    outputs = run_outputs(spec, m)
    # how deep the forward runs (the shard size's cost estimate)
    lays = outputs["layers"] or [max(s.needs_layer for s in m.resolve_sites(spec.sites))]
    budget = batch_budget(spec, m)
    tok = run_tokenizer(spec, m)
    max_tokens = spec.max_tokens if spec.max_tokens is not None else m.config.get("max_position_embeddings")
    fingerprint = list(spec.fingerprint)
    shard_size = spec.shard_size if spec.shard_size != AUTO else auto_shard_size(spec, m, lays)
    tmpl = Template(spec.template, spec.step_separator)
    return {
        "model_fingerprint": m.fingerprint, "model_type": m.config.get("model_type"),
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, **outputs,
        "pooling": spec.pooling_value, "dtype": spec.dtype, "format": spec.format, **tmpl.to_json(),
        "step_regex": spec.step_regex, "max_tokens": max_tokens, "tokenizer_sha256": tokenizer_hash(tok),
        "inputs": fingerprint,
        "dataset_sha256": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest(),
        "shard_size": shard_size, **engine_identity(m),
        # on CUDA a batch's composition changes bf16 bits (on the CPU it never
        # does): the budget that decides it is part of the run there
        **({"engine_batch_tokens": budget} if m.backend != "cpu" else {}),
        **_reading_config(spec.reading()),
        **_selection_config(spec),
        **({"limit": spec.limit} if spec.limit is not None else {}),
        **({"ids": {"count": len(spec.ids), "sha256": hashlib.sha256(
            "\n".join(spec.ids).encode("utf-8", "surrogatepass")).hexdigest()}} if spec.ids else {}),
    }


# the auto shard size: a conservative estimate of the engine's rate (FLOP/s) on
# a slow machine of each kind (this CPU engine reaches about 50 GFLOP/s on two
# Haswell cores; a GPU in bf16 some hundreds of TFLOP/s), and the seconds one
# shard should take at it, so a machine even 3x slower than the estimate still
# commits every record within about 30 s of computing it
SHARD_TARGET_S = 10.0


SLOW_FLOPS = {"cpu": 10e9, "cuda": 20e12}


AUTO_SAMPLE = 256          # records read to estimate the mean text length


SHARD_SIZE_RANGE = (10, 100_000)


def _round_down_125(n: int) -> int:
    """The largest of 1, 2, 5, 10, 20, 50, ... not above n (stable, readable sizes)."""
    best = 1
    for e in range(0, 12):
        for f in (1, 2, 5):
            if f * 10 ** e <= n:
                best = f * 10 ** e
    return best


def flops_per_token(m: Model, layers: Sequence[int], text_tokens: float) -> float:
    """Forward FLOPs of one token up to the deepest requested layer (weights
    and attention over a text of `text_tokens` tokens)."""
    c = m.config
    h, inter = c["hidden_size"], c.get("intermediate_size") or 4 * c["hidden_size"]
    hd = c.get("head_dim") or h // max(c.get("num_heads") or 1, 1)
    q, kv = (c.get("num_heads") or 1) * hd, (c.get("num_kv_heads") or c.get("num_heads") or 1) * hd
    deepest = max(max(layers), 1)
    per_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * inter) + 4 * text_tokens * q
    return float(deepest * per_layer)


def auto_shard_size(spec: RunSpec, m: Model, layers: Sequence[int]) -> int:
    """Records per shard so one shard takes about SHARD_TARGET_S seconds at a slow
    machine's rate for this model and device kind: estimated from the model's
    size, the device type and the mean text length of the first AUTO_SAMPLE
    records (2 characters per token, a pessimistic ratio), rounded down to 1-2-5
    and clamped to SHARD_SIZE_RANGE. Never from the record count, so a grown
    dataset keeps its shard boundaries."""
    lengths = [len(r.text) for r in itertools.islice(spec.records(), AUTO_SAMPLE) if isinstance(r, Record)]
    tokens = (sum(lengths) / len(lengths) if lengths else 1000.0) / 2.0 + 8.0
    rate = SLOW_FLOPS["cpu" if m.backend == "cpu" else "cuda"]
    seconds = tokens * flops_per_token(m, layers, tokens) / rate
    n = int(SHARD_TARGET_S / max(seconds, 1e-9))
    return _round_down_125(min(max(n, SHARD_SIZE_RANGE[0]), SHARD_SIZE_RANGE[1]))


def engine_identity(m: Model) -> dict:
    """The configuration fields that say which engine computed the bytes."""
    from .._native import build_info
    return {"engine_backend": m.backend, "engine_dtype": m.dtype, "engine_kernel": m.kernel,
            "package_version": build_info()["version"]}


def _reading_config(reading: dict) -> dict:
    """The configuration fields of segmentation, annotation stripping and chat, each
    only when not the default: a run without them keeps the configuration (and
    the manifest bytes) it had before these options existed."""
    out: dict = {}
    if reading["segment"].rule != "auto":
        out["segment"] = reading["segment"].rule
    if reading["strip"]:
        out["strip_annotations"] = True
    if reading["chat"] is not None:
        out.update(reading["chat"].to_json())
    return out


class _TemplateTokens:
    """A chat-rendered text holds its special tokens already (the template wrote
    them): it is encoded without the tokenizer's own (no second BOS), as
    transformers' apply_chat_template(tokenize=True) does."""

    def __init__(self, tok):
        self._tok = tok

    def encode_batch(self, texts):
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()


def _unescape(s: str) -> str:
    """Command-line convenience: \\n, \\t and \\\\ in --template / --step-separator."""
    return re.sub(r"\\(n|t|\\)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], s)

"""Sample chain-of-thought records and finished run directories without a model.

`sample_records` makes word problems with their reasoning steps in each input
format the readers take. `fake_run` turns such records into a run directory
through the real pipeline pieces: the readers build the texts and step
ranges, the tiny model's tokenizer (`models.tokenizer`) gives token ids and
step spans, and `store.RunStore` commits the shards (journal entries,
sha256 of every file, the final manifest). Only the latents are random, so
everything that reads runs (`open_latents`, `LatentDataset`, `StepPairs`,
exports, `info`, `verify`) takes the directory as it takes an extraction's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

RECORD_FORMATS = ("cot", "gsm8k", "text", "messages")
DEFAULT_FORMATS = ("cot", "gsm8k", "text")   # "messages" needs a chat template (chat=True)
FAKE_SOURCE = "sample_records.jsonl"
FAKE_KERNEL = "rjepa_latent.testing.fake_run (random latents, no model)"

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")
_THINGS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "cookies", "cards")


def _steps_range(steps) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in steps)
    except (TypeError, ValueError):
        raise ValueError(f"steps must be (min, max) step counts, got {steps!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"steps must be (min, max) with 1 <= min <= max, got {steps!r}")
    return low, high


def _problem(rng: np.random.Generator, n_steps: int) -> tuple[str, list[str], int]:
    """A word problem whose answer takes `n_steps` steps (the last states it)."""
    name, thing = _NAMES[rng.integers(len(_NAMES))], _THINGS[rng.integers(len(_THINGS))]
    total = int(rng.integers(2, 50))
    changes = [int(rng.integers(1, 30)) * (1 if rng.random() < 0.6 else -1)
               for _ in range(n_steps - 1)]
    story = [f"{name} has {total} {thing}."]
    steps = []
    for k, c in enumerate(changes, 1):
        verb = "gets" if c > 0 else "gives away"
        story.append(f"Then {name} {verb} {abs(c)} more." if k == 1 else f"Next {name} {verb} {abs(c)}.")
        new = total + c
        steps.append(f"{total} {'+' if c > 0 else '-'} {abs(c)} = {new} {thing}.")
        total = new
    steps.append(f"The answer is {total}.")
    question = " ".join(story) + f" How many {thing} does {name} have now?"
    return question, steps, total


def sample_records(n: int, seed: int = 0, *, steps: Sequence[int] = (1, 6),
                   formats: Sequence[str] = DEFAULT_FORMATS) -> list[dict]:
    """`n` chain-of-thought records (plain dicts, JSON-ready), record i in
    format `formats[i % len(formats)]`: "cot" {id, question, steps}, "gsm8k"
    {id, question, answer} (steps are the answer's lines), "text" {id, text}
    (steps start at "Step N:"), "messages" {id, messages} (needs chat=True).
    Each has between steps[0] and steps[1] reasoning steps and carries a
    `difficulty` field (kept as metadata in runs). Ids are "sample-00000",
    ... Deterministic in (n, seed, steps, formats)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in formats if f not in RECORD_FORMATS]
    if not formats or bad:
        raise ValueError(f"formats must name some of {', '.join(RECORD_FORMATS)}; got {formats!r}")
    low, high = _steps_range(steps)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(int(n)):
        question, reasoning, _ = _problem(rng, int(rng.integers(low, high + 1)))
        fmt = formats[i % len(formats)]
        rec: dict = {"id": f"sample-{i:05d}"}
        if fmt == "cot":
            rec.update(question=question, steps=reasoning)
        elif fmt == "gsm8k":
            rec.update(question=question, answer="\n".join(reasoning))
        elif fmt == "text":
            rec["text"] = question + "\n" + "\n".join(
                f"Step {k}: {s}" for k, s in enumerate(reasoning, 1))
        else:
            rec["messages"] = [{"role": "user", "content": question},
                               {"role": "assistant", "content": "\n".join(reasoning)}]
        rec["difficulty"] = len(reasoning)
        out.append(rec)
    return out


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """`records` as a JSONL file (one JSON object per line, UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def fake_run(out: str | os.PathLike, *, records: int = 100, layers: Sequence[int] = (-2,),
             poolings: Sequence[str] | str = ("mean",), hidden: int = 64,
             steps: Sequence[int] = (1, 6), per_token: bool = False, seed: int = 0,
             num_layers: int = 2, dtype: str = "float32", shard_size: int = 50) -> Path:
    """A finished run directory at `out` (created; it must not exist or be
    empty) of `records` sample records (`sample_records`, cot format) with
    random latents ~ N(0, 1): as if a model with `num_layers` layers and
    `hidden` units had been run with `layers` (hidden-state indices, as
    `extract_dataset` takes them), `poolings` (stored in that order; the
    first is `.latents`) or, with `per_token`, every token's state (pooling
    "none"), stored as `dtype`, `shard_size` records per shard. Texts, token
    ids and step spans are real (the tiny model's tokenizer); the manifest
    names the run as fake (engine_kernel). Returns the path."""
    from rjepa_latent import __version__
    from rjepa_latent.engine.model import TOKEN_POOLING, resolve_layers, resolve_poolings
    from rjepa_latent.inputs.data import Record, Template, read_rows
    from rjepa_latent.inputs.segment import DEFAULT_STEP_REGEX
    from rjepa_latent.inputs.tokenize import Item, tokenize_records, tokenizer_hash
    from rjepa_latent.store.files import STORE_DTYPES, convert_latents
    from rjepa_latent.store.write import RunStore
    from rjepa_latent.testing.models import MAX_POSITIONS, tokenizer

    for name, value, low in (("records", records, 1), ("hidden", hidden, 1),
                             ("num_layers", num_layers, 1), ("shard_size", shard_size, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if per_token:
        names = (TOKEN_POOLING,)
    else:
        names, _ = resolve_poolings(poolings if isinstance(poolings, str) else tuple(poolings))
    lays = resolve_layers(layers, int(num_layers), int(num_layers))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; fake_run writes a "
                              "new run directory")

    rows = sample_records(int(records), seed, steps=steps, formats=("cot",))
    source = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    template = Template()
    recs = [r for r in read_rows(rows, "cot", template, source=FAKE_SOURCE)]
    assert all(isinstance(r, Record) for r in recs), "sample records are always readable"
    tok = tokenizer()
    inputs = [{"name": FAKE_SOURCE, "bytes": len(source),
               "sha256": hashlib.sha256(source).hexdigest()}]
    identity = json.dumps({"hidden": int(hidden), "num_layers": int(num_layers), "seed": int(seed)},
                          sort_keys=True)
    config = {
        "model_fingerprint": hashlib.sha256(b"fake_run " + identity.encode()).hexdigest(),
        "model_type": "fake", "num_layers": int(num_layers), "hidden_size": int(hidden),
        "layers": lays, "pooling": names[0] if len(names) == 1 else list(names), "dtype": dtype,
        "format": "auto", **template.to_json(), "step_regex": DEFAULT_STEP_REGEX,
        "max_tokens": MAX_POSITIONS, "tokenizer_sha256": tokenizer_hash(tok), "inputs": inputs,
        "dataset_sha256": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(),
        "shard_size": int(shard_size), "engine_backend": "cpu", "engine_dtype": "float32",
        "engine_kernel": FAKE_KERNEL, "package_version": __version__,
        # per-token rows keep their position, token id and norm (every token)
        **({"token_selection": {"tokens": "all", "drop_bos": False}} if per_token else {}),
    }
    rng = np.random.default_rng(seed)
    store = RunStore(out, config)
    try:
        store.prepare(len(recs))
        for k, start in enumerate(range(0, len(recs), int(shard_size))):
            chunk = recs[start:start + int(shard_size)]
            items = tokenize_records(tok, chunk, MAX_POSITIONS)
            assert all(isinstance(it, Item) for it in items), "sample records fit the context"
            lats = []
            for it in items:
                rows_ = len(it.ids) if per_token else len(it.spans)
                lat = rng.standard_normal((len(names), len(lays), rows_, int(hidden)),
                                          dtype=np.float32)
                stored, reason = convert_latents(lat if len(names) > 1 else lat[0], dtype)
                assert reason is None, reason
                lats.append(stored)
            store.write_shard(k, (start, start + len(chunk)), items, lats, [])
        if not store.finish(len(recs)):
            raise RuntimeError(f"{out}: the fake run did not finish (a shard is missing)")
    finally:
        store.close()
    return out

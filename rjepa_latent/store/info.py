"""`rjepa-latent info RUN`: what a run directory holds, read from its
manifest (and the journal of a partial run) alone (no model is loaded, no
shard is opened).

Reports records done / total (the total once the run finished: records are
streamed), shards done / total, the errors grouped by reason with counts,
the configuration that made the bytes (every stored option: model
fingerprint and type, layers, pooling, stored dtype, limit, ids, segment
rule, annotation stripping, chat settings, template, the engine identity), per-worker progress
for `--part` runs of format 1, and whether the run is complete. `--json`
prints the same as one JSON object.

Design choices:
- Only the manifest and journal are read (`store.read_manifests`, the
  store's own reader), plus one `stat` per listed file: a listed file that is missing
  or of the wrong size makes the directory "damaged" (exit 2), as it would
  make `extract` refuse to resume. Checksums are not recomputed.
- Errors are grouped by `store.error_kind` (the one rule, also extract's
  summary): the reason's head with the record-specific parts (numbers,
  quoted text) replaced by placeholders, so "text has 5000 tokens, more
  than --max-tokens 2048" and "... 7000 tokens ..." count as one reason;
  one full example of each is kept.
- Exit status: 0 when the directory was read (complete or not), 2 when it
  is missing, not a run directory, foreign or damaged; the message names
  the path and what to do.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..engine.plan import part_shards
from ..errors import StoreError
from .files import ERRORS, MANIFEST, _OWN_FILE, error_kind, read_manifests


# configuration fields shown first (in this order) when present in the
# manifest; every other stored option follows (none is hidden)
CONFIG_FIELDS = ("model_fingerprint", "model_type", "num_layers", "hidden_size", "layers", "pooling",
                 "dtype", "format", "limit", "ids", "segment", "strip_annotations", "chat",
                 "chat_think", "system", "chat_template_sha256", "template", "step_separator",
                 "step_regex", "max_tokens", "shard_size", "tokenizer_sha256", "dataset_sha256",
                 "engine_backend", "engine_dtype", "engine_kernel", "engine_batch_tokens",
                 "package_version")
# shown on their own line (the input files)
_SHOWN_APART = ("inputs",)
# the text template is not used when records are rendered by the chat template
_CHAT_UNUSED = ("template", "step_separator")

def reason_group(reason: str) -> str:
    """The group of an error reason: `store.error_kind`, the one grouping rule."""
    return error_kind(reason)


def inspect_run(path: str | Path) -> dict:
    """A summary of the run directory `path` from its manifests; raises
    FileNotFoundError (no such directory) or StoreError (not a run directory,
    foreign files, disagreeing or damaged manifests)."""
    out = Path(path)
    if not out.exists():
        raise FileNotFoundError(f"{out} does not exist; give the --out directory of an "
                                "`rjepa-latent extract` run")
    if not out.is_dir():
        raise StoreError(f"{out} is not a directory; give the --out directory of an "
                         "`rjepa-latent extract` run")
    manifests = read_manifests(out)  # StoreError for an unreadable or foreign manifest
    if not manifests:
        foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE.match(p.name))
        what = (f"it holds files that are not from rjepa-latent ({', '.join(foreign[:5])})"
                if foreign else "it holds no manifest.json (empty, or the run never started)")
        raise StoreError(f"{out} is not an rjepa-latent run directory: {what}; give the --out "
                         "directory of an `rjepa-latent extract` run")
    first_name, first = next(iter(manifests.items()))
    try:
        return _summarize(out, manifests, first_name, first)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{out}: a manifest is damaged (field {e} is missing or malformed); "
                         "re-run the extraction into a new --out") from None


def _summarize(out: Path, manifests: dict[str, dict], first_name: str, first: dict) -> dict:
    config = first["config"]
    # a partial run of format 2 does not know its record count yet (records are streamed)
    num_records = None if first["num_records"] is None else int(first["num_records"])
    num_shards = None if first["num_shards"] is None else int(first["num_shards"])
    shards: dict[int, dict] = {}
    for name, m in manifests.items():
        if m["config"] != config:
            raise StoreError(f"{out}: {name} and {first_name} record different configurations; "
                             "the directory mixes two runs: keep one run per directory")
        if m["num_records"] != num_records or m["num_shards"] != num_shards:
            raise StoreError(f"{out}: {name} and {first_name} disagree on the number of records "
                             "or shards; the directory mixes two runs: keep one run per directory")
        for s in m["shards"]:
            shards.setdefault(int(s["index"]), s)
    for s in shards.values():
        for fname, finfo in s["files"].items():
            p = out / fname
            if not p.is_file() or p.stat().st_size != int(finfo["bytes"]):
                raise StoreError(f"{p} is listed in the manifest but "
                                 f"{'missing' if not p.is_file() else 'of the wrong size'}: "
                                 "`rjepa-latent verify RUN` lists every damaged file and "
                                 "`rjepa-latent extract ... --repair` (the run's own options) "
                                 "redoes those shards")
    done = [shards[k] for k in sorted(shards)]
    errors = [e for s in done for e in s["errors"]]
    groups: dict[str, dict] = {}
    for e in errors:
        g = groups.setdefault(reason_group(str(e.get("reason", ""))),
                              {"count": 0, "example": e.get("reason", ""),
                               "first": f"{e.get('source')}:{e.get('line')}"})
        g["count"] += 1
    parts = []
    for name, m in manifests.items():
        if "part" not in m:
            continue
        i, n = (int(x) for x in m["part"])
        mine = part_shards(num_shards, (i, n))
        parts.append({"part": f"{i}/{n}", "manifest": name,
                      "shards_done": sum(1 for k in mine if k in shards), "shards_total": len(mine),
                      "complete": bool(m["complete"])})
    kernels = sorted({s["kernel"] for s in done if "kernel" in s})
    merged = manifests.get(MANIFEST)
    return {
        "path": str(out),
        "complete": bool(merged is not None and merged["complete"]) and len(done) == num_shards,
        "format_version": int(first["format_version"]),
        "records_done": sum(int(s["records"][1]) - int(s["records"][0]) for s in done),
        "records_total": num_records,
        "shards_done": len(done), "shards_total": num_shards,
        "items": sum(int(s["items"]) for s in done), "steps": sum(int(s["steps"]) for s in done),
        "tokens": sum(int(s["tokens"]) for s in done), "errors": len(errors),
        "errors_by_reason": sorted(({"reason": k, **v} for k, v in groups.items()),
                                   key=lambda g: (-g["count"], g["reason"])),
        "config": _shown_config(config),
        "inputs": [f"{i.get('name')} ({i.get('bytes')} bytes)" for i in config.get("inputs", [])],
        "shard_kernels": kernels,
        "parts": parts,
        "manifests": sorted(manifests),
    }


def _shown_config(config: dict) -> dict:
    """Every stored option: the known ones in CONFIG_FIELDS order, then the
    rest in the manifest's order."""
    first = {k: config[k] for k in CONFIG_FIELDS if k in config}
    return {**first, **{k: v for k, v in config.items()
                        if k not in first and k not in _SHOWN_APART}}


def _fmt(value) -> str:
    if isinstance(value, str):
        return repr(value) if ("\n" in value or value == "" or value.strip() != value) else value
    return json.dumps(value)


def format_info(r: dict) -> str:
    pct = f" ({100 * r['records_done'] / r['records_total']:.0f}%)" if r["records_total"] else ""
    limit = r["config"].get("limit")
    if limit is not None and r["records_total"] is not None:
        pct += f" (--limit {limit}: the first {limit} records of the input)"
    if r["records_total"] is None:   # a partial run: the total is known when it finishes
        counts = [f"records: {r['records_done']} done (the total is known when the run finishes)",
                  f"shards: {r['shards_done']} done"]
    else:
        counts = [f"records: {r['records_done']} of {r['records_total']} done{pct}",
                  f"shards: {r['shards_done']} of {r['shards_total']} done"]
    lines = [f"run: {r['path']}",
             f"status: {'complete' if r['complete'] else 'not complete'}",
             *counts,
             f"stored: {r['items']} items, {r['steps']} steps, {r['tokens']} tokens",
             f"errors: {r['errors']}" + (f" (see {Path(r['path']) / ERRORS})" if r["errors"] else "")]
    for g in r["errors_by_reason"]:
        lines.append(f"  {g['count']:6d} x {g['reason']}")
        if g["count"] > 1 or g["example"] != g["reason"]:
            lines.append(f"           e.g. {g['first']}: {g['example']}")
    if r["parts"]:
        lines.append("workers (--part):")
        for p in r["parts"]:
            lines.append(f"  {p['part']}: {p['shards_done']} of {p['shards_total']} shards"
                         f"{', complete' if p['complete'] else ''}")
    lines.append("configuration:")
    chat = bool(r["config"].get("chat"))
    for k, v in r["config"].items():
        if k == "ids" and isinstance(v, dict):
            v = f"{v.get('count')} ids (sha256 {v.get('sha256')})"
        note = " (not used: --chat renders the records)" if chat and k in _CHAT_UNUSED else ""
        lines.append(f"  {k}: {_fmt(v)}{note}")
    if r["inputs"]:
        lines.append(f"  inputs: {', '.join(r['inputs'])}")
    if len(r["shard_kernels"]) > 1:
        lines.append(f"  shard kernels (--allow-kernel-change): {', '.join(r['shard_kernels'])}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory (the --out of `rjepa-latent extract`)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        r = inspect_run(args.run)
    except (StoreError, OSError) as e:
        print(f"rjepa-latent info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1, ensure_ascii=False) if args.json else format_info(r))
    return 0

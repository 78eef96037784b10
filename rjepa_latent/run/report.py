"""What a finished run says: its summary as text, the kinds of its errors, and
the exit status of `rjepa-latent extract` (one process, `--part` or `--ray`)."""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

from ..store.files import counted


def report_run(summary: dict, args: argparse.Namespace, text: str) -> int:
    """The CLI's end of an extract run (one process or Ray): the --repair line,
    the summary `text`, and the exit status (1 when nothing was extracted, or
    on errors with --strict)."""
    if args.repair:
        fixed = summary.get("repaired", [])
        print("rjepa-latent extract: --repair: every committed file checked; "
              + (f"redid shard(s) {', '.join(map(str, fixed))}" if fixed else "no shard was damaged"),
              file=sys.stderr)
        if summary.get("quarantined"):
            print("rjepa-latent extract: --repair: moved files that are not this run's into "
                  f"quarantine/: {', '.join(summary['quarantined'])}", file=sys.stderr)
    print(text)
    if nothing_extracted(summary):
        why = ("the inputs hold no records" if not summary["records"] else
               f"all {summary['errors']} records are errors; the first in full: "
               f"{summary.get('error_example')}; every reason is in {summary['errors_file']}; "
               "fix the records (or the --format / --segment options) and run again into a new --out")
        print(f"rjepa-latent extract: nothing was extracted: {why}", file=sys.stderr)
        return 1
    if args.strict and summary["errors"]:
        print(f"rjepa-latent extract: {summary['errors']} records could not be processed "
              f"(see {summary['errors_file']}); --strict", file=sys.stderr)
        return 1
    return 0


def disk_full_message(e: OSError, out: str | os.PathLike) -> str:
    """What a full disk (ENOSPC) means for the run in `out`: the path written,
    the space free there and about what one more shard needs (its largest
    committed shard so far), and that the run resumes."""
    path = Path(e.filename) if e.filename else Path(out)
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    sizes: dict[str, int] = {}
    for f in Path(out).glob("shard-*"):
        if f.is_file():
            shard = f.name.split(".", 1)[0]
            sizes[shard] = sizes.get(shard, 0) + f.stat().st_size
    need = (f"a shard of this run takes about {max(sizes.values()):,} bytes (its largest so far)"
            if sizes else "no shard was finished yet, so one shard needs more than that")
    return (f"no space left on the disk of {path} ({free:,} bytes free); {need}. Every finished "
            f"shard is kept: free space (or use another --out) and run the same command to resume")


_PYTHON_SPELLINGS = {"device='cpu'": "--device cpu", "device='cuda'": "--device cuda",
                     "max_batch_tokens=": "--max-batch-tokens "}


def cli_spelling(text: str) -> str:
    """A message of the Python API in the words of the command line: the
    engine says `use device='cpu'`, a shell user types `--device cpu`."""
    for python, cli in _PYTHON_SPELLINGS.items():
        text = text.replace(python, cli)
    return text


def nothing_extracted(s: dict) -> bool:
    """No item: the inputs hold no record, or this worker's shards hold only errors."""
    return s["items"] == 0 and (not s["records"] or s["shards_total"] > 0)


def format_errors(s: dict, top: int = 5) -> str:
    """'' or a line: the errors by kind, most common first, and where they are."""
    if not s["errors"]:
        return ""
    kinds = list(s["error_kinds"].items())
    shown = "; ".join(f"{n} x {k}" for k, n in kinds[:top])   # a kind never holds "; "
    more = f"; {sum(n for _, n in kinds[top:])} more of {len(kinds) - top} other kinds" if len(kinds) > top else ""
    return f"\n  errors by reason: {shown}{more}. Each record's reason is in {s['errors_file']}"


def format_summary(s: dict) -> str:
    counts = (f"{counted(s['items'], 'item')}, {counted(s['steps'], 'step')}, "
              f"{counted(s['errors'], 'error')}")
    if "outliers" in s:   # per-token rows over --outliers K x the median norm
        counts += f", {counted(s['outliers'], 'outlier row')}"
    if s["noop"]:
        return f"{s['out']}: already complete ({counts}); nothing to do" + format_errors(s)
    ratio = s["tokens_per_s"] / s["engine_tokens_per_s"] if s["engine_tokens_per_s"] else 0.0
    # [i/n]: this process is worker i of n (--part; 0/1 is the whole run)
    worker = "" if s["part"] == "0/1" else f" (worker {s['part']} of --part)"
    return (f"{s['out']}{worker}: {counts}; "
            f"{counted(s['shards_written'], 'shard')} written this run "
            f"({counted(s['tokens_this_run'], 'token')}) in "
            f"{s['wall_s']:.1f} s: {s['tokens_per_s']:,.0f} tokens/s end to end, "
            f"{s['engine_tokens_per_s']:,.0f} in the engine ({ratio:.0%}); "
            f"{'complete' if s['complete'] else 'not complete yet'}" + format_errors(s))

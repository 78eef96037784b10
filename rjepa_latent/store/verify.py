"""`rjepa-latent verify RUN`: check every file of a run directory against its
manifest (sizes, shard headers, every sha256, streamed; errors.jsonl against
the manifest it is derived from) and name each damaged or missing file.

Exit status: 0 all sound, 1 damage found (listed on stdout), 2 could not run
(no such directory, no or unreadable manifest)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import StoreError
from .files import damage_report, listed_shards, read_journal_lenient, read_manifests, verify_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory (written by rjepa-latent extract)")
    p.add_argument("--quick", action="store_true",
                   help="skip the payload sha256 (sizes, headers, sidecars, the manifest and "
                        "strays only)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on large runs")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress line and nothing on stdout when all is sound (the exit status says it)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.run)
    try:
        problems = verify_run(out, full=not args.quick, progress=not (args.no_progress or args.quiet))
        try:
            manifests = read_manifests(out)
            n = len(listed_shards(manifests))
            total = next(iter(manifests.values()))["num_shards"]
        except StoreError:   # a damaged journal entry: listed in `problems` below
            n, total = len(read_journal_lenient(out)[0]), None
    except (StoreError, OSError) as e:
        print(f"rjepa-latent verify: error: {e}", file=sys.stderr)
        return 2
    what = "sizes, headers and sidecars" if args.quick else "every sha256, sizes and headers"
    if not problems:
        if args.quiet:
            return 0
        state = ("complete" if n == total else f"not complete: {n} of {total} shards done so far"
                 if total is not None else f"not complete: {n} shards done so far")
        print(f"{out}: {n} listed shards sound ({what} checked); {state}")
        return 0
    print(f"{out}: {len(problems)} damaged or missing file(s) ({what} checked):\n"
          + damage_report(out, problems))
    print("rjepa-latent verify: run the same extract command with --repair to redo the damaged "
          "shards (errors.jsonl is rewritten from the manifest)", file=sys.stderr)
    return 1

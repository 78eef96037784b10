"""The `rjepa-latent extract` subcommand: its arguments, the run (one process,
`--part` or `--ray`) and the report."""
from __future__ import annotations

import argparse
import errno
import re
import sys
from pathlib import Path

from ..engine.model import CPU_NOTICE, POOLINGS, resolve_poolings
from ..inputs.data import FORMATS
from ..inputs.segment import DEFAULT_STEP_REGEX, SEGMENT_RULES
from ..inputs.select import TOKEN_MODES
from ..store.files import STORE_DTYPES, stored_config
from .driver import NothingExtracted
from .local import extract_dataset
from .report import cli_spelling, disk_full_message, format_summary, report_run
from .spec import AUTO, DEFAULT_SHARD_SIZE, _unescape


def _layers_arg(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {s!r}") from None


def _sites_arg(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--sites takes comma-separated site names, got {s!r}")
    return names


def _pooling_arg(s: str) -> str | list[str]:
    """--pooling mean or --pooling mean,max,last (one name stays a str)."""
    names = [x.strip() for x in s.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"--pooling takes comma-separated names with none empty "
                                         f"(e.g. mean,max,last), got {s!r}")
    try:
        resolve_poolings(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names[0] if len(names) == 1 else names


def _shard_size_arg(s: str) -> int | str:
    if s.strip() == AUTO:
        return AUTO
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-size takes a number of records or auto, got {s!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    # let `--layers -2,8` read as a value, not an option (argparse only knows "-2")
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")
    p.add_argument("data", nargs="+", metavar="DATA", help=".jsonl, .json (array) or .parquet files of records")
    p.add_argument("--model", help="HF checkpoint directory or .gguf file (default: the default model)")
    p.add_argument("--out", required=True, help="run directory (created; resumed if it exists)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="record format (default: by fields)")
    p.add_argument("--layers", type=_layers_arg, default=None,
                   help="comma-separated hidden_states indices, e.g. --layers=-2 or --layers=8,16 (default -2)")
    p.add_argument("--sites", type=_sites_arg, default=None,
                   help="comma-separated activation sites instead of --layers, by TransformerLens "
                        "name: blocks.B.hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|"
                        "hook_resid_post, blocks.B.mlp.hook_post, blocks.B.attn.hook_z (B < 0 "
                        "from the end; docs/sites.md)")
    p.add_argument("--pooling", default="mean", type=_pooling_arg,
                   help=f"one of {', '.join(POOLINGS)}, or several comma-separated span poolings "
                        "(e.g. mean,max,last: all stored, from one forward; the first is "
                        "`.latents`); none stores every token's hidden state (default mean)")
    p.add_argument("--dtype", default="float32", choices=list(STORE_DTYPES),
                   help="dtype of the stored latents (the engine computes in the Model's dtype)")
    p.add_argument("--template", default=None,
                   help="text template with {question} and {steps} (default '{question}\\n{steps}')")
    p.add_argument("--step-separator", default="\\n", help="between steps (default '\\n')")
    p.add_argument("--step-regex", default=DEFAULT_STEP_REGEX,
                   help=f"step marker of --format text (default {DEFAULT_STEP_REGEX!r})")
    p.add_argument("--segment", default="auto", metavar="RULE",
                   help=f"how free texts become steps: {', '.join(SEGMENT_RULES)} (default auto: the "
                        "format's own rule)")
    p.add_argument("--strip-annotations", action="store_true",
                   help="remove GSM8K calculator annotations (<<48/2=24>>) from the text")
    p.add_argument("--chat", action="store_true", help="render each record through the model's chat template")
    p.add_argument("--chat-think", action="store_true",
                   help="--chat with the steps as the assistant's reasoning (e.g. Qwen3's <think> block) "
                        "and the record's answer as its content")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest text in tokens; longer ones are errors (default: the model's context)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget of one batch")
    p.add_argument("--shard-size", type=_shard_size_arg, default=DEFAULT_SHARD_SIZE,
                   help="input records per shard, or auto (default: about 10 s of a slow machine per "
                        "shard, chosen once from the model, the device and the first records)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N records (a trial run; a later run without it grows the run)")
    p.add_argument("--ids", default=None, metavar="FILE",
                   help="only the records whose id is a line of FILE (a sample; unknown ids are reported)")
    p.add_argument("--part", default="0/1", help="worker i of n: i/n (default 0/1)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda:0 if a CUDA device is visible; never "
                        "the emulated device of a RJEPA_CUDA=emu test build)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--allow-kernel-change", action="store_true",
                   help="resume under another kernel identity (BLAS core / GPU + cuBLAS); each shard "
                        "records the kernel it was computed with")
    p.add_argument("--repair", action="store_true",
                   help="check every committed file's sha256 and redo exactly the damaged or missing "
                        "shards (a single run; the other options as for the run)")
    p.add_argument("--tokens", default="all", choices=TOKEN_MODES,
                   help="tokens kept per token (--pooling none) and pooled per step: all, text (no "
                        "special tokens, no chat scaffolding), steps (inside steps only), no-special")
    p.add_argument("--drop-bos", action="store_true",
                   help="also drop each text's first token when it is a special token (BOS, or a "
                        "chat template's opening token): the attention sink")
    p.add_argument("--outliers", type=float, default=None, metavar="K",
                   help="per-token runs: mark rows whose norm is over K x their layer's median norm "
                        "in the shard")
    p.add_argument("--drop-outliers", action="store_true", help="leave the --outliers rows out")
    p.add_argument("--strict", action="store_true", help="exit status 1 if any record is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from . import ray_cli   # --ray and its options live in run/ray_cli.py (ray itself is not imported)
    ray_cli.add_arguments(p)


def _default_model() -> str:
    try:
        from ..checkpoints.default_model import default_model_path
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.default_model":
            raise
        raise SystemExit("rjepa-latent extract: --model is required (no default model in this build)") from None
    return default_model_path()


def run(args: argparse.Namespace) -> int:
    from ..errors import ModelFormatError, StoreError
    try:
        from . import ray_cli   # --ray: run/ray.py runs it; ray is imported only then
        if ray_cli.wanted(args):
            return ray_cli.run(args)
        return _run(args)
    except NothingExtracted as e:
        print(f"rjepa-latent extract: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise   # the reader of stdout left: the console script ends quietly
    except OSError as e:   # --out unwritable, disk full
        text = disk_full_message(e, args.out) if e.errno == errno.ENOSPC else str(e)
        print(f"rjepa-latent extract: error: {text}", file=sys.stderr)
        return 2
    except (StoreError, ModelFormatError, ValueError, RuntimeError) as e:
        print(f"rjepa-latent extract: error: {cli_spelling(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished shards are listed; run the same command to resume
        print(f"\nrjepa-latent extract: interrupted; {args.out} keeps every finished shard: "
              "run the same command again to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    model = args.model or _default_model()
    summary = extract_dataset(
        args.data, model, args.out, format=args.format, layers=args.layers, sites=args.sites,
        pooling=args.pooling,
        dtype=args.dtype, template=None if args.template is None else _unescape(args.template),
        step_separator=_unescape(args.step_separator), segment=args.segment,
        strip_annotations=args.strip_annotations, chat=args.chat, chat_think=args.chat_think,
        system=args.system,
        step_regex=args.step_regex, max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
        shard_size=args.shard_size, part=args.part, progress=not args.no_progress,
        device=args.device, threads=args.threads, allow_kernel_change=args.allow_kernel_change,
        repair=args.repair, limit=args.limit, ids=args.ids, tokens=args.tokens,
        drop_bos=args.drop_bos, outliers=args.outliers, drop_outliers=args.drop_outliers)
    text = format_summary(summary)
    if args.device is None and (stored_config(Path(args.out)) or {}).get("engine_backend") == "cpu":
        text += f"\n  {CPU_NOTICE}"   # the default device's choice, shown where it was used
    return report_run(summary, args, text)


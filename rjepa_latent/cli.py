"""`rjepa-latent` console script: one subcommand per concern, each in the
module that owns it, exposing `add_arguments(parser)` and `run(args) -> int`."""
import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "extract": ("rjepa_latent.run.cli", "extract step latents of a dataset into a run directory"),
    "info": ("rjepa_latent.store.info", "show what a run directory holds: progress, errors, configuration"),
    "bench": ("rjepa_latent.tools.bench", "benchmark this engine (and HF transformers, when installed)"),
    "parity": ("rjepa_latent.tools.parity", "compare this engine with HF transformers on a model, layer by layer"),
    "verify": ("rjepa_latent.store.verify", "check a run directory's files against its manifest (every sha256)"),
    "export": ("rjepa_latent.store.export", "write a run as Parquet or flat .npy arrays for training"),
    "tokens": ("rjepa_latent.store.token_store", "shuffle a per-token run into flat row chunks for SAE training"),
    "demo": ("rjepa_latent.tools.demo", "run the built-in demo: sample chains of thought, default model, a picture"),
}


def version_text() -> str:
    """`rjepa-latent --version`: the package version and how the core was built."""
    from . import __version__, build_info
    info = build_info()
    cuda = (f"CUDA compiled in ({info['cuda_arch']})" if info.get("cuda")
            else "CUDA not compiled in (CPU only)")
    return (f"rjepa-latent {__version__}\n"
            f"core: {info.get('blas', 'unknown BLAS')}; {cuda}; "
            f"OpenMP {'on' if info.get('openmp') else 'off'}")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and build (BLAS, CUDA) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


DESCRIPTION = ("Extract pooled hidden states (step latents) of chains of thought from a decoder "
               "LLM into a resumable run directory, and inspect, verify and export them.")
EPILOG = ("Run `rjepa-latent COMMAND --help` for a command's options. A first try: "
          "`rjepa-latent demo`; then `rjepa-latent extract data.jsonl --out run/`.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rjepa-latent", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    modules = {}
    for name, (modname, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(modname)
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = mod
    args = parser.parse_args(argv)
    try:
        status = int(modules[args.command].run(args) or 0)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # the reader of our output left (`rjepa-latent info run | head -1`): stop
        # quietly, as other command-line tools do, and keep Python's own
        # flush at exit from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

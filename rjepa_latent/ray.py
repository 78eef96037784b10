"""Scale-out on Ray (see docs/ray.md): `extract` (run/ray.py: a run directory
computed by a pool of actors) and `StepLatents` (integrations/ray_data.py: a
callable class for `ray.data.Dataset.map_batches`). The public module; ray
itself is imported only when something here runs."""
from .integrations.ray_data import *  # noqa: F401,F403
from .run.ray import *  # noqa: F401,F403
from .run.ray_cli import add_arguments, run, wanted  # noqa: F401

"""Run: the shard seam. The run spec, the driver (one per run directory), the
shard worker, the local runner, Ray and the `extract` subcommand. May import
inputs/, engine/, store/, checkpoints/ and the core."""

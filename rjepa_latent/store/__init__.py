"""Store: the run directory. Writing (shards, journal, manifest), reading,
verify, info and export. May import engine/ (pooling names, shard ranges),
checkpoints/ and the core."""

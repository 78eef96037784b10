"""Tools: parity against HF transformers, the benchmark and the demo. May import
every stage (run/ and down, not the CLI)."""

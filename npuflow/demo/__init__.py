"""The demo: a tiny Llama trained in seconds on a synthetic corpus (imports nothing of npuflow)."""

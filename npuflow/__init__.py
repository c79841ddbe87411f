"""npuflow: release pipeline for Llama-family models (fetch -> quantize -> convert -> validate -> benchmark -> register -> promote)."""

__version__ = "0.1.0"

"""The `npuflow` command, one module per command group (see main.py)."""

"""What every command shares: the typer app, the CONFIG argument, the --json flag, output and logging.

Conventions (the same in every command): a run config is the positional CONFIG argument; `--json` is a
flag that prints machine-readable JSON on stdout (logs go to stderr); `--output PATH` writes files.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="npuflow: release Llama-family models to Ascend NPU, CUDA and CPU.")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ConfigArg = Annotated[Path, typer.Argument(help="YAML run config, e.g. configs/tiny-llama-cpu.yaml.")]


def emit(data: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in data.items():
        table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    Console(stderr=False).print(table)


def setup_logging(as_json: bool) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("alembic", "httpx", "urllib3", "botocore", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for engine in ("prefect.task_runs", "prefect.flow_runs"):  # they log every failure with its traceback
        logging.getLogger(engine).addFilter(_known_errors_in_one_line)


def _known_errors_in_one_line(record: logging.LogRecord) -> bool:
    """Prefect's task and flow engines log a failed run with its traceback (twice: task, then flow), ~80
    lines before npuflow's own message. For an NpuflowError (the message names the problem and the fix)
    the line stays and the traceback goes; any other exception (a bug) keeps its traceback."""
    from npuflow.core.errors import NpuflowError

    if record.exc_info and isinstance(record.exc_info[1], NpuflowError):
        record.exc_info, record.exc_text = None, None
    return True

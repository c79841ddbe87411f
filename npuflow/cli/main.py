"""The `npuflow` command: one module per command group registers its commands on the shared app.

  release.py   run, rollout, deploy            (the Prefect flows)
  model.py     make-tiny-model, fetch, quantize, convert, export-onnx   (one stage on its own)
  bench.py     benchmark, report, plan
  registry.py  models, rollback
  serve.py     serve
"""

from __future__ import annotations

import os
import sys

import typer

from npuflow.cli import bench, model, registry, release, serve  # noqa: F401  (register the commands)
from npuflow.cli.common import app, setup_logging
from npuflow.core.errors import NpuflowError


def main() -> None:
    """Entry point: NpuflowError -> one clear message and its exit code (2 bad input, 1 failed stage)."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "npuflow")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry (offline: an error line)
    setup_logging("--json" in sys.argv)
    try:
        app(standalone_mode=False)
    except NpuflowError as err:
        print(f"npuflow: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (typer.Exit, SystemExit) as err:
        sys.exit(getattr(err, "exit_code", getattr(err, "code", 0)))
    except Exception as err:  # click usage errors; torch failing to import because of torch_npu
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        if "torch_npu" in str(err) or "libhccl" in str(err) or "libascend" in str(err):
            from npuflow.runtime.backends.npu import INSTALL_HINT

            print(f"npuflow: error: torch failed to import because torch_npu is installed but cannot load ({err}). "
                  "torch auto-loads torch_npu, so without CANN `import torch` itself fails: "
                  f"{INSTALL_HINT}, or uninstall torch_npu on machines without an NPU "
                  "(TORCH_DEVICE_BACKEND_AUTOLOAD=0 also stops the auto-load)", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()

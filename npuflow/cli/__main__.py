"""`python -m npuflow.cli`: the `npuflow` command."""

from npuflow.cli.main import main

main()

"""`python -m app [COMMAND] [ARGS...]`: the `ray-detect` command (app/cli.py). Without a command, or with
Hydra overrides first, it runs the batch job: `python -m app key=value ...`."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m app.bench ...`: the same as `ray-detect bench ...`."""

import sys

from app import cli

sys.exit(cli.main(["bench", *sys.argv[1:]]))

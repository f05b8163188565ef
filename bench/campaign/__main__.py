"""`python -m bench.campaign`: the command line of bench/campaign/cli.py, its budget counted from this process's
start."""

import time

STARTED = time.monotonic()  # the budget counts from here, before the heavy imports

import sys  # noqa: E402

from .cli import main  # noqa: E402

sys.exit(main(started=STARTED))

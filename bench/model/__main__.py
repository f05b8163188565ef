"""`python -m bench.model`: the cost model's command line (`bench.model.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m sparsity_callbacks ...`: the `sparsity-callbacks` command line."""

import sys

from sparsity_callbacks.cli import main

if __name__ == "__main__":
    sys.exit(main())

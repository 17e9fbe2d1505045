"""`python -m jaxlm ...`: the same as the `jaxlm` command."""

import sys

from jaxlm.cli import main

if __name__ == "__main__":
    sys.exit(main())

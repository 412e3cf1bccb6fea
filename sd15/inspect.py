"""`python -m sd15.inspect FILE`: what a checkpoint file holds, without running anything in it (sd15.cli.inspect)."""

import sys

from sd15.cli.inspect import describe, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

"""`python -m sd15.prompt "PROMPT"`: how a prompt is read, without a model (sd15.cli.prompt)."""

import sys

from sd15.cli.prompt import describe, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

"""`python -m sd15.generate`: the command line (sd15.cli.generate), in a process that is ours."""

import sys

if __name__ == "__main__":
    from sd15.process import use_fast_memory
    use_fast_memory()          # before torch is imported: only where the process is ours

from sd15.cli.generate import CKPT_ENV, EXIT_INTERRUPTED, EXIT_USAGE, build_parser, main  # noqa: E402

__all__ = ["CKPT_ENV", "EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())

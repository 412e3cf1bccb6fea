"""`python -m sd15.batch JOB --out DIR`: the batch command line (sd15.batch.cli), in a process that is ours."""

import sys

if __name__ == "__main__":
    from sd15.process import use_fast_memory
    use_fast_memory()          # before torch is imported: only where the process is ours
    from sd15.batch.cli import main
    sys.exit(main())

"""`python -m mmcl ...` runs the `mmcl` command (mmcl.cli.main)."""
import sys

from mmcl.cli import main

if __name__ == "__main__":
    sys.exit(main())

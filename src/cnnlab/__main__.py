"""``python -m cnnlab`` runs the command line (torchrun starts data-parallel workers this way)."""

import sys

from cnnlab.cli import main

if __name__ == "__main__":
    sys.exit(main())

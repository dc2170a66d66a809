"""``python -m cnnlab`` runs the command line (torchrun starts data-parallel workers this way)."""

import sys

from cnnlab import distributed
from cnnlab.cli import main

if __name__ == "__main__":
    code = main()
    if distributed.world_from_env().size > 1:  # a worker of a torchrun job
        distributed.end_worker(code)
    sys.exit(code)

"""``python -m cnnlab`` runs the command line (torchrun starts data-parallel workers this way)."""

from cnnlab.cli import run

if __name__ == "__main__":
    run()

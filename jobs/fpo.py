"""Ray job: `sparserm fpo`. Usage: python -m jobs.fpo CONFIG [key.sub=value ...] [--output-dir DIR]

Rerun with the same --output-dir to reuse every finished method."""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["fpo", *sys.argv[1:]]))

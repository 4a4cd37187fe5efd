"""Ray job: `sparserm features`. Usage: python -m jobs.features CONFIG [key.sub=value ...] [--output-dir DIR]"""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))

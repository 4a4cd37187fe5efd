"""Ray job: `sparserm rm ablate`. Usage: python -m jobs.rm_ablate CONFIG [key.sub=value ...] [--output-dir DIR]"""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", "ablate", *sys.argv[1:]]))

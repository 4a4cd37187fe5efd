"""Ray job: `sparserm sae train`. Usage: python -m jobs.sae_train CONFIG [key.sub=value ...] [--output-dir DIR]"""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sae", "train", *sys.argv[1:]]))

"""Ray job: `sparserm rm train`. Usage: python -m jobs.rm_train CONFIG [key.sub=value ...] [--output-dir DIR]"""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", "train", *sys.argv[1:]]))

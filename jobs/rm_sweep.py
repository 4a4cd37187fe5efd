"""Ray job: `sparserm rm sweep`. Usage: python -m jobs.rm_sweep CONFIG model.extra_layers=[..] [--output-dir DIR]"""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", "sweep", *sys.argv[1:]]))

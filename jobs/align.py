"""Ray job: `sparserm align`. Usage: python -m jobs.align CONFIG [key.sub=value ...] [--output-dir DIR]

Rerun with the same --output-dir to resume a stopped job at its first unfinished step."""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))

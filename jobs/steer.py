"""Ray job: `sparserm steer`. Usage: python -m jobs.steer {build,evaluate,audit,layers} ... (as the CLI)

  python -m jobs.steer layers jobs/configs/steer-quickstart.yaml --output-dir DIR   the layers, by measurement
  python -m jobs.steer build jobs/configs/steer-quickstart.yaml --output-dir MAP     the map (and its audit)
  python -m jobs.steer evaluate MAP [key=value ...] [--data PATH] --json             steered vs unsteered vs static

Rerun with the same folders to reuse every finished part (features, SAEs, maps, evaluation parts)."""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["steer", *sys.argv[1:]]))

"""Ray job: `sparserm serve steer`. Usage: python -m jobs.serve_steer MAP_DIR [serve.key=value ...] [--host H] [--port P]

Joins the job's cluster (RAY_ADDRESS), deploys the steered chat app (OpenAI chat completions) and blocks;
`ray job stop` deletes the app. Host and token as for jobs.serve_rm."""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "steer", *sys.argv[1:]]))

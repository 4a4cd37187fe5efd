"""Ray job: `sparserm serve rm`. Usage: python -m jobs.serve_rm RM_DIR [serve.key=value ...] [--host H] [--port P]

Joins the job's cluster (RAY_ADDRESS), deploys the reward-model app and blocks; `ray job stop` deletes the app.
On a cluster pass --host 0.0.0.0 (the default binds Serve's proxy to 127.0.0.1 of the head) and set a token in
SPARSERM_SERVE_TOKEN through the runtime env."""
import sys

from sparserm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "rm", *sys.argv[1:]]))

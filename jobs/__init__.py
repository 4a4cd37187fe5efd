"""Ray job entry points: ``python -m jobs.<stage> CONFIG [key=value ...] [--output-dir DIR]``.

Each is the same stage function the CLI calls; submit to a cluster with
``ray job submit --working-dir . -- python -m jobs.rm_train jobs/configs/quickstart.yaml``.
"""

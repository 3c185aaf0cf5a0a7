"""`ray job submit --working-dir . -- python -m jobs.tune [flags]`: the hyperparameter search."""

import sys

from brainray.cli import run

if __name__ == "__main__":
    sys.exit(run(["tune", *sys.argv[1:]]))

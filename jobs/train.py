"""`ray job submit --working-dir . -- python -m jobs.train [flags]`: the training job."""

import sys

from brainray.cli import run

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]]))

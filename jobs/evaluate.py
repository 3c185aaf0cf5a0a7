"""`ray job submit --working-dir . -- python -m jobs.evaluate [flags]`: evaluate a trained model."""

import sys

from brainray.cli import run

if __name__ == "__main__":
    sys.exit(run(["evaluate", *sys.argv[1:]]))

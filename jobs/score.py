"""`ray job submit --working-dir . -- python -m jobs.score [flags]`: score archives into Parquet.

Schedulable as is (cron, Airflow, a nightly `ray job submit`): incremental by default, exit
status 0 when the run is committed (images that fail to decode are rows with status "error", not
a failure; a cleanup that fails after the commit is a warning that the next run finishes),
1 when nothing of the run was committed (the next run retries its files), 2 on bad flags.
"""

import sys

from brainray.cli import run

if __name__ == "__main__":
    sys.exit(run(["score", *sys.argv[1:]]))

"""`ray job submit --working-dir . -- python -m jobs.score [flags]`: score archives into Parquet.

Schedulable as is (cron, Airflow, a nightly `ray job submit`): incremental by default, exit
status 0 on success (images that fail to decode are rows with status "error", not a failure),
1 when the run failed (nothing was committed; the next run retries), 2 on bad flags.
"""

import sys

from brainray.cli import run

if __name__ == "__main__":
    sys.exit(run(["score", *sys.argv[1:]]))

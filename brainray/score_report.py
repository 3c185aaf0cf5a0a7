"""`brainray report OUTPUT`: report.html of a scoring output (brainray.publish's layout).

Only committed rows are read (the files `_manifest.json` names, never staging or a half-done
copy in scores/), only the columns the page needs, one file at a time, so memory is bounded by
the largest file and not by the archive. Runs on the driver, without Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from brainray import publish, storage
from brainray.config import ReportConfig
from brainray.console import say
from brainray.figures import figure_png, new_figure
from brainray.html_report import REPORT_FILE, render_scores_report
from brainray.publish import (
    COL_CONFIDENCE,
    COL_ERROR,
    COL_NEEDS_REVIEW,
    COL_OOD,
    COL_PREDICTED,
    COL_STATUS,
    STATUS_ERROR,
    STATUS_OK,
)

COLUMNS = (COL_STATUS, COL_ERROR, COL_PREDICTED, COL_CONFIDENCE, COL_NEEDS_REVIEW, COL_OOD)
CONFIDENCE_EDGES = np.linspace(0.0, 1.0, 21)
# Error texts can name sizes or members, so there may be many distinct ones; the page lists the
# most frequent and sums the rest.
MAX_ERROR_REASONS = 20
NO_REASON = "(no reason given)"


@dataclass(frozen=True)
class RowCounts:
    """What the page shows, counted over some rows; counts of two sets of rows add up."""

    rows: int = 0
    ok: int = 0
    errors: int = 0
    needs_review: int = 0  # of the ok rows
    out_of_distribution: int = 0  # of the ok rows
    predicted: Counter = field(default_factory=Counter)
    error_reasons: Counter = field(default_factory=Counter)
    confidence: tuple[int, ...] = (0,) * (len(CONFIDENCE_EDGES) - 1)  # histogram of the ok rows

    def __add__(self, other: RowCounts) -> RowCounts:
        return RowCounts(
            self.rows + other.rows, self.ok + other.ok, self.errors + other.errors,
            self.needs_review + other.needs_review,
            self.out_of_distribution + other.out_of_distribution,
            self.predicted + other.predicted, self.error_reasons + other.error_reasons,
            tuple(a + b for a, b in zip(self.confidence, other.confidence, strict=True)))


def count_rows(table: pa.Table) -> RowCounts:
    """Counts of a table holding COLUMNS (review and OOD flags and confidence of ok rows only:
    error rows have none)."""
    frame = table.to_pandas()
    ok = frame[COL_STATUS] == STATUS_OK
    error = frame[COL_STATUS] == STATUS_ERROR
    scored = frame[ok]
    confidence = scored[COL_CONFIDENCE].dropna().to_numpy(dtype=np.float64)
    return RowCounts(
        rows=len(frame), ok=int(ok.sum()), errors=int(error.sum()),
        # eq(True): a null flag (a file older than the column) is not a flag
        needs_review=int(scored[COL_NEEDS_REVIEW].eq(True).sum()),
        out_of_distribution=int(scored[COL_OOD].eq(True).sum()),
        predicted=Counter(scored[COL_PREDICTED].dropna()),
        error_reasons=Counter(reason or NO_REASON for reason in frame.loc[error, COL_ERROR]),
        confidence=tuple(np.histogram(confidence, CONFIDENCE_EDGES)[0].tolist()))


def _run_row(entry: Mapping, counts: RowCounts) -> dict:
    return {"run_id": entry["run_id"], "committed_at": entry.get("committed_at"),
            "model_id": entry.get("model_id"),
            "confidence_threshold": entry.get("confidence_threshold"), "rows": counts.rows,
            "errors": counts.errors, "needs_review": counts.needs_review,
            "out_of_distribution": counts.out_of_distribution}


def summarize(output: str, runs: Sequence[tuple[Mapping, RowCounts]],
              classes: Sequence[str]) -> dict:
    """The page's numbers (JSON-safe) from each committed run's manifest entry and row counts."""
    total = sum((counts for _, counts in runs), RowCounts())
    reasons = total.error_reasons.most_common(MAX_ERROR_REASONS)
    thresholds = [e["confidence_threshold"] for e, _ in runs
                  if e.get("confidence_threshold") is not None]
    return {
        "output": output, "classes": list(classes), "rows": total.rows, "ok": total.ok,
        "errors": total.errors, "needs_review": total.needs_review,
        "out_of_distribution": total.out_of_distribution, "predicted": dict(total.predicted),
        "error_reasons": [[reason, n] for reason, n in reasons],
        "other_error_rows": total.errors - sum(n for _, n in reasons),
        "confidence_histogram": {"edges": CONFIDENCE_EDGES.tolist(),
                                 "counts": list(total.confidence)},
        "review_thresholds": sorted(set(thresholds)),
        "runs": [_run_row(entry, counts) for entry, counts in runs],
    }


def render_confidence_histogram(histogram: Mapping, thresholds: Sequence[float] = ()) -> bytes:
    """PNG: rows per confidence bin, with the review threshold(s) the runs used."""
    fig = new_figure((7.0, 3.8))
    ax = fig.add_subplot()
    counts = histogram["counts"]
    ax.stairs(counts, histogram["edges"], fill=True, color="tab:blue", alpha=0.8)
    for threshold in thresholds:
        ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"review threshold {threshold:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Confidence (calibrated top probability)")
    ax.set_ylabel("Rows")
    ax.set_title(f"Confidence of the {sum(counts)} scored rows")
    ax.grid(True, alpha=0.3)
    if thresholds:
        ax.legend(loc="upper left", fontsize=8)
    return figure_png(fig)


def _count_run(output: str, entry: Mapping, options) -> RowCounts:
    return sum((count_rows(publish.read_columns(publish.scores_uri(output, name), COLUMNS,
                                                options)) for name in entry["files"]),
               RowCounts())


def run_report(config: ReportConfig) -> dict:
    """Read the committed rows, write the page; the summary it shows is returned."""
    options = config.storage
    runs = publish.committed_runs(config.output, options)
    if not runs:
        raise ValueError(f"{storage.redact(config.output)} holds no committed scoring run (no "
                         f"runs in its {publish.MANIFEST}); score into it first with "
                         "`brainray score --output ...`")
    counted = [(entry, _count_run(config.output, entry, options)) for entry in runs]
    summary = summarize(storage.redact(config.output), counted,
                        publish.published_classes(config.output, options) or [])
    png = render_confidence_histogram(summary["confidence_histogram"],
                                      summary["review_thresholds"])
    out = config.out or storage.join(config.output, REPORT_FILE)
    storage.write_text(out, render_scores_report(summary, png), options)
    say(f"report of {summary['rows']} row(s) from {len(runs)} committed run(s) written to "
        f"{storage.redact(out)}")
    return summary

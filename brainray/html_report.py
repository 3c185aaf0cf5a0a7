"""report.html: one self-contained page (plots as base64 data URIs, inline CSS, no scripts) per
training run, evaluation or scoring output, built by pure functions from the metrics or counts
and the PNG bytes. Every value from the data is escaped with `html.escape`.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from brainray.checkpoint import (
    ACCURACY_PNG,
    CONFUSION_PNG,
    COVERAGE_PNG,
    LOSS_PNG,
    RELIABILITY_PNG,
)

# The page's name in a run directory, an evaluation output and a scoring output.
REPORT_FILE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DISCLAIMER = "Research software: not for diagnosis."

_STYLE = """
body{margin:0;background:#eef0f3;color:#1d2430;
 font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1140px;margin:0 auto;padding:20px 32px 60px;background:#fff}
h1{font-size:1.6em;margin:.3em 0 .1em}
h2{font-size:1.2em;margin:1.8em 0 .5em;padding-bottom:4px;border-bottom:1px solid #d5dae1}
nav{font-size:.9em;margin:.6em 0 0}nav a{margin-right:14px;color:#2456a6}
table{border-collapse:collapse;margin:.5em 0 .8em}
th,td{border:1px solid #d5dae1;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f1f3f6;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.row>figure{flex:1 1 430px}.row>figure.wide{flex-basis:100%}.row>table{flex:0 0 auto}
figure{margin:0}img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#4a5361;margin-top:4px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
.card{border:1px solid #d5dae1;border-radius:6px;padding:8px}
.path{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.78em;
 color:#4a5361;word-break:break-all}
.note{color:#4a5361}.warn{color:#9b2226;font-weight:600}#runs-table td{white-space:nowrap}
"""


@dataclass(frozen=True)
class Mistake:
    """One wrong test prediction and its Grad-CAM overlay (PNG; None when none could be made)."""

    path: str
    true_label: str
    predicted_label: str
    confidence: float
    overlay_png: bytes | None = None
    empty_map: bool = False  # Grad-CAM found no positive evidence for the predicted class


@dataclass(frozen=True)
class Gallery:
    """The most confident mistakes, most confident first, or why the gallery could not be made."""

    mistakes: tuple[Mistake, ...] = ()
    error: str | None = None


# --- building blocks ------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def when(iso: str | None) -> str:
    """An ISO timestamp to the second, as people read it; anything else as it is."""
    try:
        moment = dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso or "n/a"
    offset = moment.utcoffset()
    zone = "" if offset is None else " UTC" if offset == dt.timedelta(0) else moment.strftime(" %z")
    return moment.strftime("%Y-%m-%d %H:%M:%S") + zone


def with_ci(value: float | None, ci95: Sequence[float] | None) -> str:
    """A proportion and its 95% interval, as the page shows them: '91.7% (95% CI 85.1–96.3%)'."""
    if value is None:
        return "n/a"
    if not ci95:
        return pct(value)
    return f"{pct(value)} (95% CI {pct(ci95[0])}–{pct(ci95[1])})"


def png_data_uri(png: bytes) -> str:
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("an embedded figure must be PNG bytes")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, alt: str, caption: str = "", wide: bool = False) -> str:
    """An embedded PNG at its own size (or less); a wide one takes a line of a row to itself."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    css = ' class="wide"' if wide else ""
    return f'<figure{css}><img src="{png_data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


def row(*parts: str) -> str:
    """Figures and tables side by side while the page is wide enough, else one below another."""
    return '<div class="row">' + "".join(parts) + "</div>"


def table(headers: Sequence[str], rows: Sequence[Sequence], table_id: str,
          numeric_from: int = 1) -> str:
    """A plain table; columns from `numeric_from` on are right-aligned numbers."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{esc(c)}</td>' if i >= numeric_from else
                         f"<td>{esc(c)}</td>" for i, c in enumerate(cells)) + "</tr>"
        for cells in rows)
    return (f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


class Section(NamedTuple):
    id: str
    title: str
    body: str  # HTML


def section(section_id: str, title: str, *parts: str) -> Section:
    return Section(section_id, title, "".join(parts))


def facts_table(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    return f'<table id="facts"><tbody>{rows}</tbody></table>'


def page(title: str, facts: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    """The whole document: title, disclaimer, facts, a contents line, then the sections."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body><main>"
            f"<h1>{esc(title)}</h1>{paragraph(DISCLAIMER, 'note')}"
            f"{facts_table(facts)}<nav>{nav}</nav>{body}"
            "</main></body></html>\n")


# --- the page of a training run or an evaluation ----------------------------------------------


def _headline_rows(metrics: Mapping, baseline: Mapping | None) -> list[list[str]]:
    rows = [["accuracy", with_ci(metrics["accuracy"], metrics.get("accuracy_ci95"))],
            ["macro F1", num(metrics.get("macro_f1"))],
            ["ROC-AUC (macro, one-vs-rest)", num(metrics.get("roc_auc"))],
            ["loss (cross-entropy)", num(metrics.get("loss"))],
            ["ECE (15 bins)", num(metrics.get("ece"))],
            ["images", str(metrics["n_images"])]]
    if baseline:
        values = [with_ci(baseline.get("accuracy"), baseline.get("accuracy_ci95")),
                  num(baseline.get("macro_f1")), "", "", "", str(baseline.get("n_images", ""))]
        rows = [row + [value] for row, value in zip(rows, values, strict=True)]
    return rows


def _metrics_section(metrics: Mapping) -> Section:
    baseline = metrics.get("baseline_1nn")
    headers = ["metric", "model"] + (["1-NN baseline"] if baseline else [])
    parts = [table(headers, _headline_rows(metrics, baseline), "metrics-table")]
    if baseline:
        parts.append(paragraph(
            f"Baseline: {baseline.get('method', '1-nearest-neighbour lookup')}, scored on the "
            "same test images: what memory alone achieves on this split. The gap to it is what "
            "the network adds.", "note"))
    plain = metrics.get("without_tta")
    if plain:
        parts.append(paragraph(
            f"Without test-time augmentation ({metrics.get('test_time_augmentation')}) the same "
            f"model scores accuracy {with_ci(plain['accuracy'], plain.get('accuracy_ci95'))}.",
            "note"))
    if metrics["n_images"] < 100:
        parts.append(paragraph(f"Only {metrics['n_images']} images: these numbers measure "
                               "little; see the confidence intervals.", "warn"))
    return section("metrics", "Metrics", *parts)


def _per_class_section(metrics: Mapping) -> Section:
    auc = metrics.get("roc_auc_per_class") or {}
    rows = [[name, num(row["precision"]), num(row["recall"]), num(row["f1"]),
             num(auc.get(name)), str(row["support"])]
            for name, row in metrics["per_class"].items()]
    return section("per-class", "Per class", table(
        ("class", "precision", "recall", "F1", "ROC-AUC", "support"), rows, "per-class-table"))


def _confusion_section(metrics: Mapping, png: bytes | None) -> Section:
    classes = list(metrics["classes"])
    rows = [[name, *map(str, row)] for name, row in zip(classes, metrics["confusion_matrix"],
                                                        strict=True)]
    counts = table(["true \\ predicted", *classes], rows, "confusion-table")
    if not png:
        return section("confusion", "Confusion matrix", counts)
    return section("confusion", "Confusion matrix", row(figure(
        png, "confusion matrix", "rows: true class; columns: predicted class; colour: share of "
                                 "the true class"), counts))


def _curves_section(metrics: Mapping, figs: Mapping[str, bytes]) -> Section | None:
    history = metrics.get("history")
    pngs = [(figs[name], alt) for name, alt in ((LOSS_PNG, "loss per epoch"),
                                                 (ACCURACY_PNG, "accuracy per epoch"))
            if figs.get(name)]
    if not history or not pngs:
        return None
    note = paragraph(f"Best epoch (lowest validation loss, the model shipped): "
                     f"{metrics.get('best_epoch', 'n/a')} of {len(history)} trained.", "note")
    return section("curves", "Training curves",
                   row(*(figure(png, alt) for png, alt in pngs)), note)


def _calibration_rows(cal: Mapping, abst: Mapping | None) -> list[list[str]]:
    rows = [["temperature T (fitted on validation)", num(cal.get("temperature"))],
            ["ECE on test, before / after", f"{num(cal.get('ece_before'))} / "
                                            f"{num(cal.get('ece_after'))}"],
            ["NLL on test, before / after", f"{num(cal.get('nll_before'))} / "
                                            f"{num(cal.get('nll_after'))}"]]
    if abst:
        rows += [["review threshold (calibrated confidence)", num(abst.get("threshold"))],
                 ["target accuracy of accepted images", pct(abst.get("target_accuracy"))],
                 ["test coverage (accepted)", pct(abst.get("test_coverage"))],
                 ["test accuracy of accepted images", pct(abst.get("test_accuracy"))]]
    return rows


def _calibration_section(metrics: Mapping, figs: Mapping[str, bytes]) -> Section | None:
    cal, abst = metrics.get("calibration"), metrics.get("abstention")
    pngs = [figure(figs[name], alt, caption, wide) for name, alt, caption, wide in (
        (COVERAGE_PNG, "accuracy against coverage", "accuracy of the most confident images "
                                                    "against the share accepted", False),
        (RELIABILITY_PNG, "reliability diagram", "accuracy per confidence bin, before and after "
                                                 "temperature scaling", True))
            if figs.get(name)]
    if not cal and not pngs:
        return None
    title = "Calibration and review threshold"
    if cal and "temperature" not in cal:
        return section("calibration", title, paragraph(
            f"Not calibrated ({cal.get('error', 'not run')}): the probabilities are the raw "
            "softmax.", "warn"), row(*pngs))
    numbers = [table(("measure", "value"), _calibration_rows(cal, abst),
                     "calibration-table")] if cal else []
    return section("calibration", title, row(*numbers, *pngs))


def _split_section(metrics: Mapping) -> Section | None:
    split = metrics.get("split")
    if not split or not split.get("counts"):
        return None
    classes = list(metrics["classes"])
    rows = [[name, *(str(counts.get(c, 0)) for c in classes), str(sum(counts.values()))]
            for name, counts in split["counts"].items()]
    note = paragraph(
        f"{split.get('n_images', 'n/a')} usable images in {split.get('n_groups', 'n/a')} groups; "
        f"{split.get('n_duplicate_groups', 'n/a')} groups of exact or near-duplicates hold "
        f"{split.get('n_images_in_duplicate_groups', 'n/a')} images and are kept within one "
        f"split ({split.get('n_groups_spanning_splits', 0)} groups span splits, "
        f"{split.get('n_label_conflict_groups', 0)} have conflicting labels).", "note")
    return section("split", "Split", table(["split", *classes, "total"], rows, "split-table"),
                   note)


def _leakage_section(metrics: Mapping) -> Section | None:
    leak = metrics.get("near_duplicates")
    if not leak or not leak.get("n_images"):
        return None
    rows = [["test images compared", str(leak["n_images"])],
            ["median similarity to the nearest training image", num(leak.get("median"))],
            ["share above 0.95", pct(leak.get("share_above_0.95"))],
            ["share above 0.99", pct(leak.get("share_above_0.99"))]]
    note = paragraph(f"Similarity: {leak.get('method', 'n/a')}. Re-encoded copies reach 0.99 or "
                     "more; unrelated MRI thumbnails are often above 0.95 too, so 0.95 is a "
                     "loose bound.", "note")
    return section("leakage", "Near-duplicates across the split",
                   table(("measure", "value"), rows, "leakage-table"), note)


def _mistake_card(m: Mistake) -> str:
    text = (f"true {m.true_label}, predicted {m.predicted_label} "
            f"(confidence {m.confidence:.3f}); heatmap: evidence for {m.predicted_label}"
            + ("; the map is empty: no positive evidence for it" if m.empty_map else ""))
    image = (f'<img src="{png_data_uri(m.overlay_png)}" alt="Grad-CAM of {esc(m.path)}">'
             if m.overlay_png else paragraph("no Grad-CAM overlay for this image", "note"))
    return (f'<div class="card">{image}<p>{esc(text)}</p>'
            f'<p class="path">{esc(m.path)}</p></div>')


def _mistakes_section(metrics: Mapping, gallery: Gallery | None) -> Section:
    cm = metrics["confusion_matrix"]
    wrong = metrics["n_images"] - sum(cm[i][i] for i in range(len(cm)))
    predictions = f"{wrong} wrong prediction{'' if wrong == 1 else 's'}"
    if wrong == 0:
        body = [paragraph(f"No mistakes on the {metrics['n_images']} images.", "note")]
    elif gallery is None or gallery.error:
        reason = gallery.error if gallery else "not made for this report"
        body = [paragraph(f"{predictions}; the gallery could not be made: {reason}", "warn")]
    else:
        shown = (f"All {predictions}" if len(gallery.mistakes) == wrong
                 else f"The {len(gallery.mistakes)} most confident of {predictions}")
        body = [paragraph(f"{shown}, most confident first. Grad-CAM shows where the evidence "
                          "for the (wrong) predicted class was found.", "note"),
                '<div class="gallery">' + "".join(map(_mistake_card, gallery.mistakes))
                + "</div>"]
    return section("mistakes", "Most confident mistakes", *body)


def _run_facts(metrics: Mapping) -> list[tuple[str, str]]:
    facts = [("model", f"{metrics.get('model_name', 'n/a')} (model_id "
                       f"{metrics.get('model_id', 'n/a')})")]
    if metrics.get("model"):  # an evaluation names the checkpoint it loaded
        facts.append(("checkpoint", str(metrics["model"])))
    config = metrics.get("config") or {}
    data = metrics.get("data") or config.get("data")
    if data:
        facts.append(("data", str(data)))
    if metrics.get("training_wall_s") is not None:
        facts.append(("training time", f"{metrics['training_wall_s']:.0f} s"))
    facts.append(("unreadable files skipped", str(len(metrics.get("skipped_files", [])))))
    return facts


def render_run_report(metrics: Mapping, figs: Mapping[str, bytes],
                      gallery: Gallery | None = None) -> str:
    """report.html of a training run (it has a `history`) or an evaluation, from its
    metrics.json content and its PNG figures by file name (those present are shown)."""
    kind = "Training run" if metrics.get("history") else "Evaluation"
    sections = [_metrics_section(metrics), _per_class_section(metrics),
                _confusion_section(metrics, figs.get(CONFUSION_PNG)),
                _curves_section(metrics, figs), _calibration_section(metrics, figs),
                _split_section(metrics), _leakage_section(metrics),
                _mistakes_section(metrics, gallery)]
    title = f"{kind}: {metrics.get('model_name') or 'brainray model'}"
    return page(title, _run_facts(metrics), [s for s in sections if s])


# --- the page of a scoring output ---------------------------------------------------------------


def _share(part: int, whole: int) -> str:
    return pct(part / whole) if whole else "n/a"


def _overview_section(summary: Mapping) -> Section:
    rows, ok = summary["rows"], summary["ok"]
    table_rows = [["all", str(rows), ""],
                  ["scored (status ok)", str(ok), _share(ok, rows) + " of rows"],
                  ["errors (status error)", str(summary["errors"]),
                   _share(summary["errors"], rows) + " of rows"],
                  ["needs review", str(summary["needs_review"]),
                   _share(summary["needs_review"], ok) + " of scored rows"],
                  ["out of distribution", str(summary["out_of_distribution"]),
                   _share(summary["out_of_distribution"], ok) + " of scored rows"]]
    note = paragraph("A row needs review when its calibrated confidence is below the review "
                     "threshold or it is out of distribution (not brain MRI by the guard's "
                     "checks).", "note")
    return section("overview", "Overview",
                   table(("rows", "count", "rate"), table_rows, "overview-table"), note)


def _classes_section(summary: Mapping) -> Section:
    predicted, ok = summary["predicted"], summary["ok"]
    names = list(summary["classes"]) + sorted(set(predicted) - set(summary["classes"]))
    rows = [[name, str(predicted.get(name, 0)), _share(predicted.get(name, 0), ok)]
            for name in names]
    return section("classes", "Rows per predicted class",
                   table(("predicted class", "rows", "share of scored rows"), rows,
                         "classes-table"))


def _confidence_section(histogram_png: bytes) -> Section:
    return section("confidence", "Confidence", row(figure(
        histogram_png, "confidence histogram", "calibrated confidence (the top probability) "
                                               "of the scored rows; dashed: review threshold")))


def _errors_section(summary: Mapping) -> Section:
    reasons = summary["error_reasons"]
    if not reasons:
        return section("errors", "Errors", paragraph("No error rows.", "note"))
    rows = [[reason, str(count)] for reason, count in reasons]
    if summary.get("other_error_rows"):
        rows.append(["(other reasons)", str(summary["other_error_rows"])])
    return section("errors", "Errors", table(("reason", "rows"), rows, "errors-table"))


def _runs_section(summary: Mapping) -> Section:
    rows = [[r["run_id"], when(r.get("committed_at")), r.get("model_id") or "n/a",
             num(r.get("confidence_threshold")), str(r["rows"]), str(r["errors"]),
             str(r["needs_review"]), str(r["out_of_distribution"])] for r in summary["runs"]]
    return section("runs", "Runs", table(
        ("run_id", "committed", "model_id", "review threshold", "rows", "errors", "needs review",
         "out of distribution"), rows, "runs-table", numeric_from=3),
        paragraph("Committed runs in commit order, from the output's manifest.", "note"))


def render_scores_report(summary: Mapping, histogram_png: bytes) -> str:
    """report.html of a scoring output from its counts (brainray.score_report.summarize) and the
    confidence histogram."""
    runs = summary["runs"]
    facts = [("output", summary["output"]), ("committed runs", str(len(runs))),
             ("models", ", ".join(dict.fromkeys(r.get("model_id") or "n/a" for r in runs))),
             ("last commit", when(runs[-1].get("committed_at")) if runs else "n/a")]
    sections = [_overview_section(summary), _classes_section(summary),
                _confidence_section(histogram_png), _errors_section(summary),
                _runs_section(summary)]
    return page("Scoring output", facts, sections)

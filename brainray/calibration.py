"""Calibration (temperature scaling) and abstention (a review threshold): pure functions and plots.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T > 0 chosen to minimise the
negative log-likelihood (NLL) of the validation split. It changes confidences, never the predicted
class. Predictions reach the driver as probabilities; log p = logits - logsumexp(logits) are the
logits up to a per-row constant, which softmax ignores, so T is fitted on log-probabilities.

Abstention: the review threshold is the smallest confidence t such that the validation images with
calibrated confidence >= t are classified with at least the target accuracy; images below it are
sent to a human (`needs_review`). Its coverage (the share accepted) is reported on validation and
test, with the whole risk-coverage curve of the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from brainray import metrics as metric_fns
from brainray.config import COL_LABEL, COL_PROBS
from brainray.figures import figure_png, new_figure

# float32 softmax underflows to 0 below ~1e-38; clipping there keeps log p finite.
LOG_PROB_FLOOR = 1e-38
# Bounds on T: beyond them the fit is extrapolating from a degenerate validation set (e.g. no
# validation errors at all pushes T towards 0); the report says when a bound was hit.
TEMPERATURE_BOUNDS = (0.1, 10.0)
CV_FOLDS = 5
N_BINS = 15


def log_probs(probs) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), LOG_PROB_FLOOR, 1.0))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities the model gives with its logits divided by T."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, not {temperature}")
    return softmax(log_probs(probs) / temperature)


def nll(y, probs) -> float:
    """Mean negative log-likelihood of the true class."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    return float(-log_probs(p[np.arange(len(y)), y]).mean())


def _nll_of_logits(z: np.ndarray, y: np.ndarray) -> float:
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def fit_temperature(probs, y) -> dict:
    """The T in TEMPERATURE_BOUNDS minimising validation NLL of softmax(log p / T).

    The NLL of temperature-scaled logits is convex in 1/T, so a bounded scalar search on log T
    finds the optimum. A T < 1 is used only if it also beats T = 1 on held-out folds
    (`cross_validated_nll`); otherwise T is 1 and `rejected_by_cross_validation` says so. Returns
    the temperature, the fitted one, whether it sits on a bound, and the NLL at T=1 and at T.
    """
    y = np.asarray(y, dtype=np.int64)
    z = log_probs(probs)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on an empty validation set")
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    temperature = _fit_log_t(z, y)
    nll_one, nll_fit = _nll_of_logits(z, y), _nll_of_logits(z / temperature, y)
    if not nll_fit <= nll_one:  # never make validation worse than no scaling
        temperature, nll_fit = 1.0, nll_one
    # Only a sharpening T must prove itself on held-out folds: it makes every confidence more
    # extreme, the costly direction for a model whose low-confidence images go to review.
    held_out = cross_validated_nll(z, y) if temperature < 1 else None
    kept = held_out is None or held_out["fitted"] < held_out["at_1"]
    at_bound = min(abs(math.log(temperature) - low), abs(math.log(temperature) - high)) < 1e-3
    return {"temperature": temperature if kept else 1.0, "at_bound": bool(at_bound and kept),
            "val_nll_before": nll_one, "val_nll_after": nll_fit if kept else nll_one,
            "n_val": int(len(y)), "val_errors": int((z.argmax(1) != y).sum()),
            "fitted_temperature": temperature, "cross_validated_nll": held_out,
            "rejected_by_cross_validation": not kept}


def _fit_log_t(z: np.ndarray, y: np.ndarray) -> float:
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: _nll_of_logits(z / math.exp(log_t), y),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x)) if np.isfinite(result.x) else 1.0


def cross_validated_nll(z: np.ndarray, y: np.ndarray, folds: int = CV_FOLDS) -> dict | None:
    """Mean held-out NLL at T = 1 and at the T fitted on the other folds (interleaved folds).

    A validation split with a handful of errors fits a T < 1 that sharpens every prediction,
    including the next confident mistake; measured on data the fit did not see, such a T loses
    to T = 1, and the fit is not used. None when there are too few images to fold.
    """
    if len(y) < 2 * folds:
        return None
    fold = np.arange(len(y)) % folds
    at_1, fitted = [], []
    for k in range(folds):
        train, held = fold != k, fold == k
        t = _fit_log_t(z[train], y[train])
        at_1.append(_nll_of_logits(z[held], y[held]))
        fitted.append(_nll_of_logits(z[held] / t, y[held]))
    return {"folds": folds, "at_1": float(np.mean(at_1)), "fitted": float(np.mean(fitted))}


def review_threshold(confidence, correct, target_accuracy: float) -> dict:
    """The smallest confidence threshold whose accepted set (confidence >= t) reaches the target.

    Returns threshold, coverage (share accepted), accuracy of the accepted set, and `achieved`.
    When no threshold reaches the target, the threshold is 1.0 (practically everything goes to
    review) and `achieved` is false.
    """
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target accuracy must be in (0, 1], not {target_accuracy}")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    n = len(conf)
    if n == 0:
        raise ValueError("cannot choose a threshold on an empty set")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    accuracy = np.cumsum(ok) / np.arange(1, n + 1)
    # A threshold equal to conf[i] accepts every image with that confidence: only the last index of
    # each run of ties is a real operating point.
    last_of_tie = np.append(conf[1:] != conf[:-1], True)
    valid = np.flatnonzero(last_of_tie & (accuracy >= target_accuracy - 1e-12))
    if len(valid) == 0:
        accepted = int((conf >= 1.0).sum())
        return {"threshold": 1.0, "coverage": accepted / n,
                "accuracy": float(ok[:accepted].mean()) if accepted else None,
                "achieved": False, "target_accuracy": target_accuracy, "n": n}
    i = int(valid[-1])  # the largest accepted set = the smallest threshold
    return {"threshold": float(conf[i]), "coverage": (i + 1) / n, "accuracy": float(accuracy[i]),
            "achieved": True, "target_accuracy": target_accuracy, "n": n}


def operating_point(confidence, correct, threshold: float) -> dict:
    """Coverage and accepted-set accuracy of a fixed threshold on another split."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    accepted = conf >= threshold
    n_accepted = int(accepted.sum())
    return {"coverage": n_accepted / max(len(conf), 1), "n_accepted": n_accepted,
            "accuracy": float(ok[accepted].mean()) if n_accepted else None, "n": int(len(conf))}


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and accuracy of the k most confident images, for k = 1..n."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)[np.argsort(-conf, kind="stable")]
    k = np.arange(1, len(ok) + 1)
    return k / len(ok), np.cumsum(ok) / k


def reliability_bins(y, probs, n_bins: int = N_BINS) -> dict:
    """Per equal-width confidence bin: count, mean confidence and accuracy (None when empty)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    confidence, correct = p.max(1), p.argmax(1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges.tolist(), "count": counts.tolist(),
                "confidence": [float(c) if n else None for c, n in zip(conf_sum / counts, counts,
                                                                        strict=True)],
                "accuracy": [float(a) if n else None for a, n in zip(acc_sum / counts, counts,
                                                                      strict=True)]}


def render_reliability_diagram(y, probs_before, probs_after, n_bins: int = N_BINS,
                               temperature: float | None = None) -> bytes:
    """PNG: accuracy per confidence bin against the diagonal, before and after calibration."""
    fig = new_figure((9.0, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    titles = ("uncalibrated (T = 1)",
              f"calibrated (T = {temperature:.3g})" if temperature else "calibrated")
    for ax, probs, title in zip(axes, (probs_before, probs_after), titles, strict=True):
        bins = reliability_bins(y, probs, n_bins)
        width = 1.0 / n_bins
        centres = np.asarray(bins["edges"][:-1]) + width / 2
        acc = [a if a is not None else 0.0 for a in bins["accuracy"]]
        ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        gaps = [(c, cf) for c, cf in zip(centres, bins["confidence"], strict=True)
                if cf is not None]
        if gaps:
            ax.scatter([g[0] for g in gaps], [g[1] for g in gaps], color="tab:red", marker="_",
                       s=120, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ece = metric_fns.expected_calibration_error(np.asarray(y), probs, n_bins)
        ax.set_title(f"{title}\nECE {ece:.3f}, NLL {nll(y, probs):.3f}")
        ax.set_xlabel("Confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return figure_png(fig)


def render_coverage_curve(confidence, correct, threshold: float | None = None,
                          target_accuracy: float | None = None,
                          title: str = "Accuracy vs coverage (test)") -> bytes:
    """PNG: accuracy of the most confident images against the share of images accepted."""
    coverage, accuracy = risk_coverage(confidence, correct)
    fig = new_figure((6.0, 4.2))
    ax = fig.add_subplot()
    ax.plot(coverage, accuracy, color="tab:blue", label="accepted-set accuracy")
    if target_accuracy is not None:
        ax.axhline(target_accuracy, color="tab:green", linestyle="--", linewidth=1,
                   label=f"target {target_accuracy:g}")
    if threshold is not None:
        point = operating_point(confidence, correct, threshold)
        if point["accuracy"] is not None:
            ax.scatter([point["coverage"]], [point["accuracy"]], color="tab:red", zorder=3,
                       label=f"threshold {threshold:.3f}: coverage {point['coverage']:.0%}")
    ax.set_xlabel("Coverage (share of images accepted, most confident first)")
    ax.set_ylabel("Accuracy of accepted images")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(max(0.0, min(accuracy.min(), target_accuracy or 1.0) - 0.05), 1.01)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return figure_png(fig)


def _labels_probs(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    probs = np.stack(predictions[COL_PROBS].to_numpy()).astype(np.float64)
    return predictions[COL_LABEL].to_numpy().astype(np.int64), probs


@dataclass
class CalibrationResult:
    temperature: float
    review_threshold: float
    report: dict  # metrics.json "calibration" and "abstention" sections
    test_predictions: pd.DataFrame  # the test predictions with calibrated probabilities
    reliability_png: bytes
    coverage_png: bytes


def calibrate_run(val_predictions: pd.DataFrame, test_predictions: pd.DataFrame,
                  target_accuracy: float) -> CalibrationResult:
    """Fit T on validation, choose the review threshold on calibrated validation confidences,
    and report both on the test split (ECE and NLL before/after, coverage and accuracy)."""
    y_val, p_val = _labels_probs(val_predictions)
    y_test, p_test = _labels_probs(test_predictions)
    fit = fit_temperature(p_val, y_val)
    temperature = fit["temperature"]
    p_val_cal, p_test_cal = apply_temperature(p_val, temperature), apply_temperature(
        p_test, temperature)
    review = review_threshold(p_val_cal.max(1), p_val_cal.argmax(1) == y_val, target_accuracy)
    test_correct = p_test_cal.argmax(1) == y_test
    test_point = operating_point(p_test_cal.max(1), test_correct, review["threshold"])
    calibration = {
        "method": "temperature scaling of the logits, fitted by minimising validation NLL",
        **fit,
        "ece_before": metric_fns.expected_calibration_error(y_test, p_test),
        "ece_after": metric_fns.expected_calibration_error(y_test, p_test_cal),
        "nll_before": nll(y_test, p_test), "nll_after": nll(y_test, p_test_cal),
        "val_ece_before": metric_fns.expected_calibration_error(y_val, p_val),
        "val_ece_after": metric_fns.expected_calibration_error(y_val, p_val_cal),
        "n_bins": N_BINS, "split": "test",
    }
    abstention = {
        "method": "smallest threshold on calibrated validation confidence whose accepted images "
                  "reach the target accuracy",
        "target_accuracy": target_accuracy, "threshold": review["threshold"],
        "achieved_on_val": review["achieved"], "val_coverage": review["coverage"],
        "val_accuracy": review["accuracy"], "test_coverage": test_point["coverage"],
        "test_accuracy": test_point["accuracy"], "test_n_accepted": test_point["n_accepted"],
    }
    calibrated = test_predictions.copy()
    calibrated[COL_PROBS] = list(p_test_cal.astype(np.float32))
    return CalibrationResult(
        temperature=temperature, review_threshold=review["threshold"],
        report={"calibration": calibration, "abstention": abstention},
        test_predictions=calibrated,
        reliability_png=render_reliability_diagram(y_test, p_test, p_test_cal,
                                                   temperature=temperature),
        coverage_png=render_coverage_curve(p_test_cal.max(1), test_correct, review["threshold"],
                                           target_accuracy))

"""Evaluation metrics and plots for the brain-MRI classifier.

Pure functions: numpy arrays in, JSON-serialisable dicts or PNG bytes out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from brainray.figures import figure_png, new_figure

_PROB_CLIP = 1e-12
# Loose enough for float16/float32 softmax outputs, tight enough to catch logits.
_ROW_SUM_TOL = 1e-3


def _as_label_prob_arrays(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n_samples, n_classes), got shape {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics on empty input")
    if y.shape[0] != p.shape[0]:
        raise ValueError(
            f"y_true and probs have mismatched lengths: {y.shape[0]} labels vs {p.shape[0]} rows"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must contain integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true labels must lie in [0, {p.shape[1] - 1}]")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    if not np.allclose(p.sum(axis=1), 1.0, atol=_ROW_SUM_TOL):
        raise ValueError("each row of probs must sum to 1 (pass softmax outputs, not logits)")
    return y.astype(np.int64), p


def _validate(y_true, probs, classes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [str(c) for c in classes]
    p = np.asarray(probs, dtype=float)
    if p.ndim == 2 and p.shape[1] != len(names):
        raise ValueError(
            f"probs has {p.shape[1]} columns but {len(names)} classes were given"
        )
    y, p = _as_label_prob_arrays(y_true, p)
    return y, p, names


def accuracy_ci95(n_correct: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval for a binomial proportion n_correct / n."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= n_correct <= n:
        raise ValueError(f"n_correct must lie in [0, n={n}], got {n_correct}")
    ci = binomtest(int(n_correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins over (0, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _as_label_prob_arrays(y_true, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" makes bins right-closed, so a confidence of exactly 1.0 lands in the last bin.
    bin_idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    # (count/n) * |mean_acc - mean_conf| simplifies to |sum_acc - sum_conf| / n per bin.
    sum_conf = np.bincount(bin_idx, weights=confidence, minlength=n_bins)
    sum_acc = np.bincount(bin_idx, weights=correct, minlength=n_bins)
    return float(np.abs(sum_acc - sum_conf).sum() / y.shape[0])


def _cross_entropy(y: np.ndarray, p: np.ndarray) -> float:
    p_true = np.clip(p[np.arange(y.shape[0]), y], _PROB_CLIP, 1.0)
    return float(-np.log(p_true).mean())


def _per_class_prf(y, pred, names) -> dict[str, dict[str, float | int]]:
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=range(len(names)), zero_division=0
    )
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }


def _averaged_prf(y, pred, n_classes: int) -> dict[str, float]:
    out = {}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y, pred, labels=range(n_classes), average=average, zero_division=0
        )
        out[f"{average}_precision"] = float(precision)
        out[f"{average}_recall"] = float(recall)
        out[f"{average}_f1"] = float(f1)
    return out


def _roc_auc_per_class(y, p, names) -> dict[str, float | None]:
    # One-vs-rest AUC is undefined unless a class has both positives and negatives.
    result: dict[str, float | None] = {}
    for i, name in enumerate(names):
        positives = y == i
        if positives.all() or not positives.any():
            result[name] = None
        else:
            result[name] = float(roc_auc_score(positives, p[:, i]))
    return result


def classification_metrics(y_true, probs, classes: Sequence[str],
                           loss: float | None = None) -> dict:
    """Full evaluation summary as plain Python types (safe for json.dumps)."""
    y, p, names = _validate(y_true, probs, classes)
    k = len(names)
    pred = p.argmax(axis=1)
    n = int(y.shape[0])
    n_correct = int((pred == y).sum())
    auc_per_class = _roc_auc_per_class(y, p, names)
    defined_aucs = [v for v in auc_per_class.values() if v is not None]
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "accuracy_ci95": list(accuracy_ci95(n_correct, n)),
        "n_images": n,
        "classes": names,
        "loss": float(loss) if loss is not None else _cross_entropy(y, p),
        "per_class": _per_class_prf(y, pred, names),
        **_averaged_prf(y, pred, k),
        "confusion_matrix": confusion_matrix(y, pred, labels=range(k)).tolist(),
        "roc_auc": float(np.mean(defined_aucs)) if defined_aucs else None,
        "roc_auc_per_class": auc_per_class,
        "ece": expected_calibration_error(y, p),
    }


def distinct_image_metrics(y_true, y_pred, groups, classes: Sequence[str]) -> dict:
    """Accuracy and per-class recall with each duplicate group counted once (its first image in
    the order given). Copies of one image inside the test split otherwise count it several
    times, and the images' CI treats the copies as independent evidence."""
    y, pred, groups = (np.asarray(a) for a in (y_true, y_pred, groups))
    first = np.sort(np.unique(groups, return_index=True)[1])
    y, pred = y[first], pred[first]
    correct = int((y == pred).sum())
    recall = {name: float((pred[y == i] == i).mean()) if (y == i).any() else None
              for i, name in enumerate(classes)}
    return {"method": "each duplicate group of the split counted once (its first image by path)",
            "n_images": int(len(y)), "accuracy": correct / len(y),
            "accuracy_ci95": list(accuracy_ci95(correct, len(y))), "recall": recall}


def _series(history: Sequence[Mapping], key: str) -> list[float]:
    # Missing or None values become NaN so a partial history still plots.
    return [float("nan") if h.get(key) is None else float(h[key]) for h in history]


def _render_history(history: Sequence[Mapping], metric: str, ylabel: str) -> bytes:
    if not history:
        raise ValueError("history is empty; nothing to plot")
    epochs = [h["epoch"] for h in history]
    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    ax.plot(epochs, _series(history, f"train_{metric}"), marker="o", label="train")
    ax.plot(epochs, _series(history, f"val_{metric}"), marker="o", label="validation")
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return figure_png(fig)


def render_accuracy_curve(history: Sequence[Mapping]) -> bytes:
    """PNG of train/validation accuracy against epoch."""
    return _render_history(history, "accuracy", "Accuracy")


def render_loss_curve(history: Sequence[Mapping]) -> bytes:
    """PNG of train/validation loss against epoch."""
    return _render_history(history, "loss", "Loss")


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    row_sums = cm.sum(axis=1, keepdims=True)
    # Classes absent from y_true have an all-zero row; show them as 0 recall, not NaN.
    return np.divide(cm, row_sums, out=np.zeros_like(cm, dtype=float), where=row_sums > 0)


def render_confusion_matrix(
    confusion_matrix, classes: Sequence[str], title: str = "Confusion matrix"
) -> bytes:
    """PNG heatmap: rows true, columns predicted; colour is row-normalised recall."""
    cm = np.asarray(confusion_matrix, dtype=np.int64)
    names = [str(c) for c in classes]
    k = len(names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {k} classes")
    recall = _row_normalise(cm)
    size = max(4.0, 1.2 * k + 2.0)
    fig = new_figure((size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="Fraction of true class (recall)")
    for i in range(k):
        for j in range(k):
            colour = "white" if recall[i, j] > 0.5 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{recall[i, j]:.0%}", ha="center", va="center",
                    color=colour, fontsize=9)
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    return figure_png(fig)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_summary(metrics: Mapping) -> str:
    """Short plain-text table of the headline numbers, for end-of-run logs."""
    low, high = metrics["accuracy_ci95"]
    accuracy_line = (
        f"Accuracy : {metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, "
        f"n={metrics['n_images']})"
    )
    scores_line = (
        f"Macro F1 : {metrics['macro_f1']:.4f}   Loss: {_fmt(metrics.get('loss'))}   "
        f"ROC-AUC: {_fmt(metrics.get('roc_auc'))}   ECE: {_fmt(metrics.get('ece'))}"
    )
    lines = [accuracy_line, scores_line]
    per_class = metrics["per_class"]
    width = max([len("class"), *(len(name) for name in per_class)])
    lines.append(f"{'class':<{width}}  precision  recall  f1      support")
    for name, row in per_class.items():
        lines.append(
            f"{name:<{width}}  {row['precision']:<9.4f}  {row['recall']:<6.4f}  "
            f"{row['f1']:<6.4f}  {row['support']}"
        )
    return "\n".join(lines)

"""MODEL_CARD.md of a training run, generated from its metrics.json content by a pure function."""

from __future__ import annotations

from collections.abc import Mapping

from brainray.metrics import accuracy_ci95

INTENDED_USE = (
    "Research on automated triage of 2-D brain MRI slices into glioma, meningioma, pituitary "
    "tumour or no tumour; benchmarking; teaching. **Not for diagnosis** and not for any "
    "clinical decision: it is not a medical device, has not been validated prospectively, and "
    "its output must not reach a patient's record.")

LIMITATIONS = [
    "Trained on single 2-D slices (JPEG/PNG exports) without patient identifiers: adjacent "
    "slices of one patient can fall on both sides of the split, so test metrics may be "
    "optimistic even after duplicate removal.",
    "The public datasets mix sources, scanners, sequences (T1, T1-contrast, T2, FLAIR) and "
    "planes; performance on another hospital's data is unknown until measured there "
    "(`brainray evaluate`).",
    "Four classes only: any other finding (metastasis, stroke, haemorrhage, artefact, "
    "post-operative change) is forced into one of them. The out-of-distribution guard only "
    "catches gross mistakes (colour photos, blank images, documents).",
    "Confidence is calibrated on the validation split of the same distribution; under "
    "distribution shift calibration and the review threshold degrade.",
    "Grad-CAM heatmaps are coarse (the last convolution's resolution) and show where evidence "
    "was found, not why; they are not a segmentation.",
]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ci(n_correct: int, n: int) -> str:
    if n <= 0:
        return "n/a"
    low, high = accuracy_ci95(n_correct, n)
    return f"{_pct(n_correct / n)} ({_pct(low)}-{_pct(high)})"


def _data_section(metrics: Mapping) -> list[str]:
    config = metrics.get("config", {})
    split = metrics.get("split", {})
    lines = ["## Data and split", ""]
    lines.append(f"- Training data: `{config.get('data', 'n/a')}`"
                 + (f"; held-out test data: `{config['test_data']}`"
                    if config.get("test_data") else "; the test split is carved out of it"))
    preprocess = config.get("preprocess", {})
    lines.append(f"- Preprocessing: resized to {preprocess.get('image_size', 'n/a')} px square, "
                 "8-bit gray (the network sees it as the paper's three equal channels), scaled "
                 f"to [0, 1]; augmentation `{config.get('augment', 'n/a')}`.")
    if split:
        lines.append(
            f"- {split.get('n_images', 'n/a')} usable images in {split.get('n_groups', 'n/a')} "
            f"duplicate groups; {split.get('n_duplicate_groups', 'n/a')} groups of exact or "
            f"near-duplicates (SHA-256, or perceptual hash within "
            f"{config.get('dedup_max_hamming', 'n/a')} bits) hold "
            f"{split.get('n_images_in_duplicate_groups', 'n/a')} images; whole groups are kept "
            f"in one split ({split.get('n_groups_spanning_splits', 0)} groups span splits; "
            f"{split.get('n_label_conflict_groups', 0)} groups have conflicting labels).")
        counts = split.get("counts", {})
        classes = list(metrics.get("classes", []))
        if counts and classes:
            lines += ["", "| split | " + " | ".join(classes) + " | total |",
                      "|---|" + "---|" * (len(classes) + 1)]
            for name, row in counts.items():
                lines.append(f"| {name} | " + " | ".join(str(row.get(c, 0)) for c in classes)
                             + f" | {sum(row.values())} |")
    skipped = metrics.get("skipped_files", [])
    lines.append("")
    lines.append(f"- Unreadable files skipped: {len(skipped)} (listed in metrics.json).")
    return lines + [""]


def _metrics_section(metrics: Mapping) -> list[str]:
    classes = list(metrics["classes"])
    cm = metrics["confusion_matrix"]
    n = metrics["n_images"]
    correct = sum(cm[i][i] for i in range(len(classes)))
    low, high = metrics["accuracy_ci95"]
    lines = ["## Test metrics", "",
             f"Test split: {n} images. Accuracy **{_pct(metrics['accuracy'])}** (95% Wilson CI "
             f"{_pct(low)}-{_pct(high)}; {correct}/{n}); macro F1 {_num(metrics.get('macro_f1'))}; "
             f"ROC-AUC (macro, one-vs-rest) {_num(metrics.get('roc_auc'))}; "
             f"loss {_num(metrics.get('loss'))}; ECE {_num(metrics.get('ece'))}.", "",
             "| class | recall (sensitivity), 95% CI | precision, 95% CI | F1 | ROC-AUC "
             "| support |",
             "|---|---|---|---|---|---|"]
    auc = metrics.get("roc_auc_per_class", {}) or {}
    for i, name in enumerate(classes):
        support = sum(cm[i])
        predicted = sum(row[i] for row in cm)
        f1 = metrics.get("per_class", {}).get(name, {}).get("f1")
        lines.append(f"| {name} | {_ci(cm[i][i], support)} | {_ci(cm[i][i], predicted)} | "
                     f"{_num(f1)} | {_num(auc.get(name))} | {support} |")
    lines += ["", "Confusion matrix (rows = true class, columns = predicted):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for name, row in zip(classes, cm, strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    baseline = metrics.get("baseline_1nn")
    if baseline and baseline.get("accuracy") is not None:
        lines += ["", f"Trivial baseline on the same split ({baseline.get('method', '1-NN')}): "
                      f"accuracy {_pct(baseline['accuracy'])}, macro F1 "
                      f"{_num(baseline.get('macro_f1'))}. A gap to it is what the network "
                      "adds over memorising near-duplicates."]
    lines += _leakage_lines(metrics.get("near_duplicates")) + _distinct_lines(
        metrics.get("distinct_images"))
    plain = metrics.get("without_tta")
    if plain:
        lines += ["", f"Without test-time augmentation ({metrics.get('test_time_augmentation')}) "
                      f"the same model scores accuracy {_pct(plain['accuracy'])}, macro F1 "
                      f"{_num(plain.get('macro_f1'))}."]
    if n < 100:
        lines += ["", f"*The test split has only {n} images: these numbers measure little; "
                      "see the confidence intervals.*"]
    return lines + [""]


def _distinct_lines(distinct: Mapping | None) -> list[str]:
    """The test metrics with each duplicate group counted once."""
    if not distinct or not distinct.get("n_images"):
        return []
    low, high = distinct["accuracy_ci95"]
    recall = ", ".join(f"{name} {_num(value)}" for name, value in distinct["recall"].items())
    return ["", f"Distinct test images ({distinct.get('method')}): {distinct['n_images']}, "
                f"accuracy {_pct(distinct['accuracy'])} (95% Wilson CI {_pct(low)}-{_pct(high)}); "
                f"recall {recall}. Copies of one image within the test split count once here."]


def _leakage_lines(leakage: Mapping | None) -> list[str]:
    """How close the test images still are to training images, beside the 1-NN baseline."""
    if not leakage or not leakage.get("n_images"):
        return []
    return ["", f"Near-duplication left across the split ({leakage.get('method')}): median "
                f"{_num(leakage.get('median'))}; {_pct(leakage.get('share_above_0.95'))} of the "
                f"test images are above 0.95 and {_pct(leakage.get('share_above_0.99'))} above "
                "0.99 (thumbnails of re-encoded copies reach 0.99 or more; plain cosine of "
                "MRI thumbnails is high for unrelated slices too, so 0.95 is a loose bound)."]


def _training_line(config: Mapping, metrics: Mapping, history: list) -> str:
    ema = config.get("ema_decay") or 0
    initial = metrics.get("initial_weights")
    return (f"- Recipe `{metrics.get('recipe', config.get('recipe', 'n/a'))}`"
            + (f" (overridden: {metrics['recipe_overrides']})"
               if metrics.get("recipe_overrides") else "")
            + f". Best epoch {metrics.get('best_epoch', 'n/a')} of {len(history)} trained "
            f"(early stopping on validation loss, patience {config.get('patience', 'n/a')}); "
            f"seed {config.get('seed', 'n/a')}; {config.get('optimizer', 'adam')}, lr "
            f"{config.get('lr', 'n/a')} ({config.get('lr_schedule', 'n/a')}), weight decay "
            f"{config.get('weight_decay', 'n/a')}, label smoothing "
            f"{config.get('label_smoothing', 0)}, "
            + (f"EMA of the weights (decay {ema}) shipped" if ema else "no EMA")
            + f", test-time augmentation {metrics.get('test_time_augmentation', 'none')}; batch "
            f"{config.get('batch_size_per_worker', 'n/a')} x {config.get('num_workers', 'n/a')} "
            f"worker(s); precision {_precision(config, history)}; initial weights "
            + (f"{initial['source']} (sha256 {initial['sha256']})" if initial
               else "random (trained from scratch)") + ".")


def _rejection(cal: Mapping) -> str:
    if not cal.get("rejected_by_cross_validation"):
        return ""
    held_out = cal["cross_validated_nll"]
    return (f" (the fit, T = {cal['fitted_temperature']:.3f} from {cal.get('val_errors', 'n/a')} "
            f"validation errors, lost to T = 1 on held-out folds: NLL {held_out['fitted']:.4f} "
            f"against {held_out['at_1']:.4f}, so it is not used)")


def _calibration_section(metrics: Mapping) -> list[str]:
    cal, abst = metrics.get("calibration"), metrics.get("abstention")
    lines = ["## Calibration and abstention", ""]
    if not cal or "temperature" not in cal:
        reason = (cal or {}).get("error", "not run")
        return lines + [f"Not calibrated ({reason}): probabilities are the raw softmax.", ""]
    lines.append(
        f"Temperature scaling fitted on the validation split ({cal.get('n_val', 'n/a')} images): "
        f"T = {cal['temperature']:.3f}"
        + (" (at a search bound: the validation set is too small or too easy to fit T "
           "reliably)" if cal.get("at_bound") else "") + _rejection(cal) + ". On the test split:")
    lines += ["", "| | ECE (15 bins) | NLL |", "|---|---|---|",
              f"| before (T = 1) | {_num(cal.get('ece_before'))} | {_num(cal.get('nll_before'))} |",
              f"| after | {_num(cal.get('ece_after'))} | {_num(cal.get('nll_after'))} |", "",
              "Reliability diagram: `reliability.png`. Probabilities reported by scoring and "
              "evaluation are the calibrated ones.", ""]
    if abst:
        achieved = abst.get("achieved_on_val")
        lines.append(
            f"Review threshold: images with calibrated confidence below "
            f"**{abst['threshold']:.3f}** get `needs_review = true`. It is the smallest threshold "
            f"whose accepted validation images reach {_pct(abst['target_accuracy'])} accuracy "
            + ("(reached: " if achieved else "(**not reached**: ")
            + f"coverage {_pct(abst.get('val_coverage'))}, accuracy "
            f"{_pct(abst.get('val_accuracy'))}). On the test split it accepts "
            f"{_pct(abst.get('test_coverage'))} of images ({abst.get('test_n_accepted', 'n/a')}) "
            f"with accuracy {_pct(abst.get('test_accuracy'))}; curve: `coverage.png`.")
        lines.append("")
    return lines


def _failure_modes(metrics: Mapping) -> list[str]:
    classes = list(metrics["classes"])
    cm = metrics["confusion_matrix"]
    lines = ["## Known failure modes", ""]
    errors = sorted(((cm[i][j], i, j) for i in range(len(classes)) for j in range(len(classes))
                     if i != j and cm[i][j] > 0), reverse=True)
    if "glioma" in classes and "meningioma" in classes:
        g, m = classes.index("glioma"), classes.index("meningioma")
        lines.append(
            f"- **Glioma vs meningioma** are the classically confused tumour types (both can be "
            f"large enhancing masses near the cortex): glioma predicted as meningioma "
            f"{cm[g][m]}/{sum(cm[g])} ({_pct(cm[g][m] / max(sum(cm[g]), 1))}), meningioma as "
            f"glioma {cm[m][g]}/{sum(cm[m])} ({_pct(cm[m][g] / max(sum(cm[m]), 1))}) on the test "
            "split.")
    if "notumor" in classes:
        t = classes.index("notumor")
        missed = sum(cm[i][t] for i in range(len(classes)) if i != t)
        tumours = sum(sum(cm[i]) for i in range(len(classes)) if i != t)
        lines.append(f"- **Missed tumours** (a tumour predicted as notumor, the costliest error "
                     f"for triage): {missed}/{tumours} ({_pct(missed / max(tumours, 1))}).")
    if errors:
        top = ", ".join(f"{classes[i]} -> {classes[j]}: {c}" for c, i, j in errors[:3])
        lines.append(f"- Most frequent test errors (true -> predicted): {top}.")
    else:
        lines.append("- No test errors: the test split is too small or too easy to show "
                     "failure modes.")
    shortcut = metrics.get("shortcut")
    if shortcut:
        bg = shortcut["background_only"]["balanced_accuracy"]
        lines.append(
            f"- Shortcut check: balanced accuracy {_pct(bg)} on background-only images, "
            f"{_pct(shortcut['brain_only']['balanced_accuracy'])} on brain-only images (chance "
            f"{_pct(shortcut['chance_balanced_accuracy'])}): "
            + ("**shortcut suspected** - the model can classify without the brain."
               if shortcut["shortcut_suspected"] else "no shortcut detected."))
    else:
        lines.append("- Shortcut check not run for this report: run `brainray evaluate ... "
                     "--shortcut-check` to measure accuracy on background-only images.")
    lines.append("- Inputs that are not brain MRI (photos, blank images, documents) are flagged "
                 "`out_of_distribution` by scoring; other modalities (CT) or unusual sequences "
                 "may pass the guard and still be classified.")
    return lines + [""]


def _architecture_line(metrics: Mapping) -> str:
    name = metrics.get("model_name", metrics.get("config", {}).get("model", "n/a"))
    params = metrics.get("n_parameters")
    size = f", {params:,} parameters" if isinstance(params, int) else ""
    arch = metrics.get("architecture") or {}
    shape = (" (" + ", ".join(f"{k} {v}" for k, v in arch.items()) + ")") if arch else ""
    return (f"- Architecture: `{name}`{shape}{size}; classes "
            f"{', '.join(metrics.get('classes', []))}.")


def _precision(config: Mapping, history: list) -> str:
    """What the epochs actually ran in (a resumed run may differ), else the configured setting."""
    used = list(dict.fromkeys(h["precision"] for h in history if h.get("precision")))
    return ", ".join(used) if used else str(config.get("precision", "n/a"))


def render_model_card(metrics: Mapping) -> str:
    """Markdown model card from a training run's metrics.json content."""
    config = metrics.get("config", {})
    history = metrics.get("history", [])
    lines = [f"# Model card: {metrics.get('model_name', config.get('model', 'brainray model'))} "
             f"({metrics.get('model_id', 'n/a')})", "",
             "*Research software: not for diagnosis.*", "",
             "## Model", "",
             _architecture_line(metrics),
             f"- `model_id` {metrics.get('model_id', 'n/a')} (hash of the weights; every score "
             "row carries it).",
             _training_line(config, metrics, history), "",
             "## Intended use", "", INTENDED_USE, "",
             "Out of scope: diagnosis, treatment decisions, screening of patients, any use "
             "without a qualified reader reviewing every image; images that are not axial, "
             "coronal or sagittal 2-D brain MRI slices.", ""]
    lines += _data_section(metrics)
    lines += _metrics_section(metrics)
    lines += _calibration_section(metrics)
    lines += _failure_modes(metrics)
    lines += ["## Limitations", ""] + [f"- {item}" for item in LIMITATIONS] + [""]
    lines += ["## Files", "",
              "`model.pt` (checkpoint with temperature and review threshold), `metrics.json`, "
              "`predictions.parquet`, `confusion_matrix.png`, `reliability.png`, "
              "`coverage.png`, `accuracy.png`, `loss.png`, `split.parquet`, `config.json`.", ""]
    return "\n".join(lines)

"""What the stricter grouping does to the lookup baseline: the 1-NN thumbnail baseline and the
near-duplicates left across the split, with the default grouping (perceptual hash) and with
`--dedup-min-similarity` linking, on the same decoded data and seeds as `brainray train`.

    python -m bench.leakage [--data DIR] [--seeds 0 1] [--min-similarity 0 0.99] [--out F]

The data is decoded once (as a training run decodes it, at --image-size); every setting and seed
is then a split, a 1-NN baseline and a near-duplicate summary on that split's test images. No
training: what the same settings do to the model is `bench.study`'s `bn128_e45_strict099` row.
"""

from __future__ import annotations

import argparse
import json

from bench.common import DEFAULT_DATA
from brainray.config import (
    COL_GROUP,
    COL_LABEL,
    COL_SPLIT,
    DEFAULT_CLASSES,
    PreprocessConfig,
    StorageOptions,
)
from brainray.data import assign_splits, load_labeled
from brainray.split import split_report
from brainray.train import baseline_metrics, near_duplicates

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def measure(index, seed: int, min_similarity: float, max_hamming: int) -> dict:
    """One split of the decoded index: its groups, 1-NN baseline and leftover near-duplicates."""
    split = assign_splits(index, FRACTIONS, seed, max_hamming, None, min_similarity)
    train, test = (split[split[COL_SPLIT] == name] for name in ("train", "test"))
    groups = split_report(split[COL_LABEL].to_numpy(), split[COL_GROUP].to_numpy(),
                          split[COL_SPLIT].to_numpy(), list(DEFAULT_CLASSES))
    nn = baseline_metrics(train, test, list(DEFAULT_CLASSES))
    return {"seed": seed, "min_similarity": min_similarity, "n_groups": groups["n_groups"],
            "n_test": len(test), "baseline_1nn_accuracy": round(nn["accuracy"], 4),
            "baseline_1nn_ci95": [round(v, 4) for v in nn["accuracy_ci95"]],
            "near_duplicates": near_duplicates(train, test)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--min-similarity", type=float, nargs="+", default=[0.0, 0.99])
    parser.add_argument("--max-hamming", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out", default="bench-leakage.json")
    args = parser.parse_args(argv)
    labeled = load_labeled(args.data, list(DEFAULT_CLASSES),
                           PreprocessConfig(image_size=args.image_size), StorageOptions())
    rows = [measure(labeled.index, seed, similarity, args.max_hamming)
            for similarity in args.min_similarity for seed in args.seeds]
    for row in rows:
        near = row["near_duplicates"]
        print(f"min similarity {row['min_similarity']:.2f} seed {row['seed']}: "
              f"{row['n_groups']} groups, {row['n_test']} test images, 1-NN "
              f"{row['baseline_1nn_accuracy']:.4f} {row['baseline_1nn_ci95']}, test share "
              f"> 0.95 / > 0.99 similar {near['share_above_0.95']:.3f} / "
              f"{near['share_above_0.99']:.3f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

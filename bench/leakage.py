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
from brainray.config import COL_GROUP, COL_SPLIT, RECIPES, PreprocessConfig, TrainConfig
from brainray.data import assign_splits, load_labeled
from brainray.train import baseline_metrics, near_duplicates


def measure(index, config: TrainConfig, seed: int, min_similarity: float) -> dict:
    """One split of the decoded index, with `config`'s fractions and Hamming bound as training
    splits it: its groups, 1-NN baseline and leftover near-duplicates."""
    split = assign_splits(index, config.split_fractions, seed, config.dedup_max_hamming, None,
                          min_similarity)
    train, test = (split[split[COL_SPLIT] == name] for name in ("train", "test"))
    nn = baseline_metrics(train, test, list(config.classes))
    return {"seed": seed, "min_similarity": min_similarity,
            "n_groups": int(split[COL_GROUP].nunique()),
            "n_test": len(test), "baseline_1nn_accuracy": round(nn["accuracy"], 4),
            "baseline_1nn_ci95": [round(v, 4) for v in nn["accuracy_ci95"]],
            "near_duplicates": near_duplicates(train, test)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--min-similarity", type=float, nargs="+", default=[0.0, 0.99])
    parser.add_argument("--max-hamming", type=int, default=TrainConfig.dedup_max_hamming)
    parser.add_argument("--image-size", type=int, default=RECIPES["default"]["image_size"])
    parser.add_argument("--out", default="bench-leakage.json")
    args = parser.parse_args(argv)
    # a training run's settings, so the splits are the ones `brainray train` draws; no run is
    # written, so it has no run directory
    config = TrainConfig(data=args.data, run_dir="", dedup_max_hamming=args.max_hamming,
                         preprocess=PreprocessConfig(image_size=args.image_size))
    labeled = load_labeled(config.data, list(config.classes), config.preprocess, config.storage)
    rows = [measure(labeled.index, config, seed, similarity)
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

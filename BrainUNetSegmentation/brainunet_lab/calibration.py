"""Choose a model's tumour threshold on held-out data-engine cases (never on real test cases).

A network trained with a recall-weighted Tversky loss (alpha 0.3, beta 0.7) over-segments: on
held-out engine cases such a model's whole-tumour false positives outnumbered its false negatives
7 to 1 (MODEL_CARD.md). A threshold chosen here may not carry over to real scans; check it on
labelled real cases before registering it. Moving the decision from argmax to "tumour when P(tumour) >= t" corrects
that bias without retraining. The threshold is chosen where the mean Dice over the five regions is
highest, on engine cases whose seeds are disjoint from training and from the reporting seed set.
"""
from __future__ import annotations

import numpy as np

from brainunet.labels import ALL_REGIONS

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def sweep(probabilities: list[np.ndarray], references: list[np.ndarray], masks: list[np.ndarray],
          thresholds=DEFAULT_THRESHOLDS) -> list[dict]:
    """One row per decision rule ("argmax", then each threshold): mean Dice per region over the
    cases, their mean, and the summed whole-tumour false-positive / false-negative voxels."""
    from .evaluation import dice
    from brainunet.postprocess import probabilities_to_labels

    rows = []
    for threshold in (None, *thresholds):
        scores = {r.key: [] for r in ALL_REGIONS}
        fp = fn = 0
        for probs, ref, mask in zip(probabilities, references, masks):
            pred = probabilities_to_labels(probs, mask, threshold)
            for region in ALL_REGIONS:
                scores[region.key].append(dice(region.mask(pred), region.mask(ref)))
            fp += int(((pred > 0) & (ref == 0)).sum())
            fn += int(((pred == 0) & (ref > 0)).sum())
        row = {"threshold": "argmax" if threshold is None else float(threshold)}
        row.update({f"dice_{k}": float(np.mean(v)) for k, v in scores.items()})
        row["dice_mean"] = float(np.mean([row[f"dice_{r.key}"] for r in ALL_REGIONS]))
        row.update(wt_false_positive_voxels=fp, wt_false_negative_voxels=fn)
        rows.append(row)
    return rows


def best(rows: list[dict]) -> dict:
    """The rule with the highest mean Dice (argmax wins ties: no change without a gain)."""
    return max(rows, key=lambda r: (round(r["dice_mean"], 4), r["threshold"] == "argmax"))


def engine_probabilities(model, cases: int, seed_set: int, device: str = "cpu", progress=None,
                         anatomy_source: str = "sri24"):
    """Probabilities of ``model`` (a LoadedModel) on held-out engine cases at its working spacing."""
    from .engine import generate_case, load_anatomy
    from brainunet.inference import predict_probabilities
    from .training import TrainConfig, validation_seeds

    pp = model.preprocessing
    anatomy = load_anatomy(pp.spacing_mm[0], source=anatomy_source)
    probabilities, references, masks = [], [], []
    seeds = validation_seeds(TrainConfig(seed=seed_set, validation_cases=cases))
    for n, seed in enumerate(seeds):
        if progress:
            progress(n / len(seeds), f"Engine case {n + 1} of {len(seeds)}")
        case = generate_case(seed, anatomy)
        probabilities.append(predict_probabilities(model.network, case.image.numpy(), pp.patch_size,
                                                   device=device, precision="fp32"))
        references.append(case.labels.numpy())
        masks.append(case.mask.numpy())
    return probabilities, references, masks

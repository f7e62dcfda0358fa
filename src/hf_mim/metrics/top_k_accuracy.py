"""Top-k accuracy as an `evaluate` metric module, shipped inside hf_mim so it loads offline.

`evaluate.load("accuracy")` fetches its script from the Hub; this file is loaded by path instead
(`hf_mim.metrics.load_top_k_accuracy()`). `evaluate` copies the file into its modules cache and
imports it on its own, so it imports only `datasets`, `evaluate` and `numpy` (one per line: the
loader parses the import lines).

Inputs: `predictions`, the scores of every class per example ([N, num_classes] logits or
probabilities), and `references`, the true class ids [N]. An example counts as correct at k when
its true class is among its k highest scores (ties broken by class id: the lower id ranks first).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose true class is among the k highest-scoring classes."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class scores per example (logits or probabilities), [N, C].
    references (`list` of `int`): true class ids in [0, C).
    k (`int` or `list` of `int`, defaults to `[1, 5]`): the k values to report; each must be <= C.
Returns:
    `top{k}` (`float`) for every requested k, in [0, 1].
Examples:
    >>> metric = evaluate.load("/path/to/hf_mim/metrics/top_k_accuracy.py")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 0], k=[1, 2])
    {'top1': 0.5, 'top2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        scores = np.asarray(predictions, dtype=np.float64)  # [N, C]
        labels = np.asarray(references, dtype=np.int64)  # [N]
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must be [N, num_classes] class scores for the N references; got shape "
                f"{list(scores.shape)} for {labels.shape[0]} references."
            )
        num_classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"references must be class ids in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
        ks = [int(k)] if np.isscalar(k) else [int(value) for value in k]
        if any(value < 1 or value > num_classes for value in ks):
            raise ValueError(f"k={ks} must lie in [1, {num_classes}] (the number of classes).")
        # Rank of the true class: how many classes score strictly higher, plus equal-scoring lower ids.
        true_scores = scores[np.arange(labels.shape[0]), labels][:, None]  # [N, 1]
        class_ids = np.arange(num_classes)[None, :]  # [1, C]
        ahead = (scores > true_scores) | ((scores == true_scores) & (class_ids < labels[:, None]))  # [N, C]
        rank = ahead.sum(axis=1)  # [N], 0 = the top prediction
        return {f"top{value}": float((rank < value).mean()) if labels.size else 0.0 for value in ks}

"""Mean intersection-over-union for semantic segmentation, as an `evaluate` metric module shipped
inside hf_mim so that it loads offline (`hf_mim.metrics.load_mean_iou()`); the same definition as
mmsegmentation's and the Hub's `mean_iou`: per class, IoU = |pred = c and label = c| / |pred = c or
label = c| summed over ALL pixels of the evaluation set (not averaged per image), pixels labelled
`ignore_index` left out; the mean runs over the classes that occur in the labels or predictions
(a class absent from both has no IoU and is left out, NaN in `per_category_iou`).

`evaluate` copies this file into its modules cache and imports it on its own, so it imports only
`datasets`, `evaluate` and `numpy` (one per line: the loader parses the import lines).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean intersection-over-union of the classes of a semantic segmentation, over all pixels."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `ndarray`): predicted class id per pixel, [H, W] each.
    references (`list` of `ndarray`): true class id per pixel, [H, W] each (`ignore_index` = no label).
    num_labels (`int`): the number of classes.
    ignore_index (`int`, defaults to 255): the label of pixels to leave out.
Returns:
    `mean_iou`, `mean_accuracy` (mean per-class pixel recall), `overall_accuracy` (labelled pixels right),
    `per_category_iou` and `per_category_accuracy` (lists, NaN for classes absent from both).
Examples:
    >>> metric = evaluate.load("/path/to/hf_mim/metrics/mean_iou.py")
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]], num_labels=2)["mean_iou"]
    0.25
"""


def confusion_counts(predictions, references, num_labels: int, ignore_index: int) -> np.ndarray:
    """[num_labels, num_labels] pixel counts, rows = true class, columns = predicted class."""
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references):
        prediction, reference = np.asarray(prediction, dtype=np.int64), np.asarray(reference, dtype=np.int64)
        if prediction.shape != reference.shape:
            raise ValueError(f"A prediction of shape {list(prediction.shape)} for a label map of shape "
                             f"{list(reference.shape)}: predict at the label's resolution.")
        labelled = reference != ignore_index
        prediction, reference = prediction[labelled], reference[labelled]
        if reference.size and (reference.min() < 0 or reference.max() >= num_labels):
            raise ValueError(f"Label values [{reference.min()}, {reference.max()}] outside [0, {num_labels}) (and "
                             f"not the ignore_index {ignore_index}).")
        if prediction.size and (prediction.min() < 0 or prediction.max() >= num_labels):
            raise ValueError(f"Predicted classes outside [0, {num_labels}).")
        counts += np.bincount(reference * num_labels + prediction, minlength=num_labels**2).reshape(num_labels, -1)
    return counts


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
            }),
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255):
        counts = confusion_counts(predictions, references, int(num_labels), int(ignore_index))
        true_positives = np.diag(counts).astype(np.float64)  # [K]
        labelled = counts.sum(axis=1)  # [K] pixels of each true class
        predicted = counts.sum(axis=0)  # [K] pixels predicted as each class
        union = labelled + predicted - true_positives
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, true_positives / union, np.nan)
            accuracy = np.where(labelled > 0, true_positives / labelled, np.nan)
        total = counts.sum()
        return {
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else 0.0,
            "overall_accuracy": float(true_positives.sum() / total) if total else 0.0,
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
        }

"""Metric modules shipped with hf_mim, loaded by path so evaluation works offline.

```python
from hf_mim.metrics import load_top_k_accuracy
metric = load_top_k_accuracy()
metric.compute(predictions=logits, references=labels, k=[1, 5])  # {"top1": ..., "top5": ...}
```
"""

from __future__ import annotations

from pathlib import Path

TOP_K_ACCURACY_PATH = str(Path(__file__).resolve().with_name("top_k_accuracy.py"))
MEAN_IOU_PATH = str(Path(__file__).resolve().with_name("mean_iou.py"))


def load_metric_module(path: str, what: str, **kwargs):
    """`evaluate.load` of a metric module packaged with hf_mim (no network access)."""
    try:
        import evaluate
    except ImportError as error:
        raise ImportError(
            f"{what} is computed with the `evaluate` library: `pip install evaluate` "
            "(a dependency of hf_mim: reinstall it)."
        ) from error
    return evaluate.load(path, **kwargs)


def load_top_k_accuracy(**kwargs):
    """Top-1 / top-5 accuracy (`top_k_accuracy.py`)."""
    return load_metric_module(TOP_K_ACCURACY_PATH, "Top-1/top-5 accuracy", **kwargs)


def load_mean_iou(**kwargs):
    """Semantic-segmentation mean IoU (`mean_iou.py`): `compute(predictions, references, num_labels, ignore_index)`."""
    return load_metric_module(MEAN_IOU_PATH, "Mean IoU", **kwargs)


__all__ = ["MEAN_IOU_PATH", "TOP_K_ACCURACY_PATH", "load_mean_iou", "load_top_k_accuracy"]

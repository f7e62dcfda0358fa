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


def load_top_k_accuracy(**kwargs):
    """`evaluate.load` of the packaged top-k accuracy module (no network access)."""
    try:
        import evaluate
    except ImportError as error:
        raise ImportError(
            "Top-1/top-5 accuracy is computed with the `evaluate` library: `pip install evaluate` "
            "(a dependency of hf_mim: reinstall it)."
        ) from error
    return evaluate.load(TOP_K_ACCURACY_PATH, **kwargs)


__all__ = ["TOP_K_ACCURACY_PATH", "load_top_k_accuracy"]

"""Evaluate a frozen hf_mim encoder without fine-tuning: linear probe and k-NN accuracy.

    python examples/probe.py                                    # the pre-training demo (outputs/pretrain-mae) on digits
    python examples/probe.py --model_name_or_path CKPT --dataset_name DATASET --pooling mean
    python examples/probe.py --config_name mae-demo             # a randomly initialised encoder, as a baseline

Pooled features (CLS after the final norm, or the mean patch token) of the train and evaluation
splits are computed once; a BatchNorm + linear probe is trained on them (SGD, cosine) and a
temperature-weighted k-NN (DINO: k=20, T=0.07) votes. Results: printed and written to
--output_dir/probe_results.json. The code lives in `hf_mim.finetuning.probe`.
"""

from hf_mim.data import DataSourceUnreachableError
from hf_mim.finetuning.probe import main

if __name__ == "__main__":
    try:
        main()
    except DataSourceUnreachableError as error:  # one sentence: the traceback adds nothing to it
        raise SystemExit(f"error: {error}") from None

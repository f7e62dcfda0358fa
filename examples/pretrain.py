"""Masked-image-modeling pre-training with Accelerate.

    python examples/pretrain.py                      # tiny MAE on the embedded digits, a few CPU minutes
    python examples/pretrain.py --method beit --tokenizer PATH_OR_ID    # also beitv2, peco; vit_mpp needs none
    accelerate launch examples/pretrain.py --help    # every option, grouped

The methods live in `hf_mim.pretraining`, the loop in the training engine `hf_mim.training`, the data
pipeline in `hf_mim.data`.
"""

from hf_mim.data import DataSourceUnreachableError
from hf_mim.pretraining import main

if __name__ == "__main__":
    try:
        main()
    except DataSourceUnreachableError as error:  # one sentence: the traceback adds nothing to it
        raise SystemExit(f"error: {error}") from None

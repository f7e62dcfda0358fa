"""Train a visual tokenizer (DALL-E dVAE, BEiT v2's VQ-KD, PeCo) with Accelerate.

    python examples/train_tokenizer.py --method dvae                 # tiny dVAE on the embedded digits
    python examples/pretrain.py && python examples/train_tokenizer.py --method vqkd --teacher outputs/pretrain-mae
    accelerate launch examples/train_tokenizer.py --method peco --help   # every option, grouped

The methods live in `hf_mim.tokenizer_training`; the loop is pretrain.py's (the engine `hf_mim.training`).
"""

from hf_mim.data import DataSourceUnreachableError
from hf_mim.tokenizer_training import main

if __name__ == "__main__":
    try:
        main()
    except DataSourceUnreachableError as error:  # one sentence: the traceback adds nothing to it
        raise SystemExit(f"error: {error}") from None

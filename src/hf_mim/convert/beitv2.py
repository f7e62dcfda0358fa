"""BEiT v2 checkpoints -> hf_mim ``BEiTForMaskedImageModeling`` with the CLS head (or the fine-tuned models).

SRC is a reference checkpoint of microsoft/unilm beit2 (``{'model'|'module': state_dict}``): the
pre-training files hold the backbone, ``lm_head`` and the CLS-aggregation head ``cls_pt_layers.N``,
which becomes ``use_cls_pretext_head=True`` with ``cls_head_depth`` = the number of stored blocks (and
``shared_lm_head=False`` when the file has the head's own ``cls_pt_norm`` / ``cls_pt_lm_head``).
Which block's patch tokens feed that head is not in the weights: ``cls_head_early_layer`` defaults
to the published depth - 3 (9 of 12, 21 of 24); pass --config cls_head_early_layer=K otherwise.
A file without ``cls_pt_layers`` is converted without the CLS head (with a warning); fine-tuned
files (``head``) become a ``BEiTForImageClassification``. Everything else is as for
``python -m hf_mim.convert beit`` (its help lists the defaults the weights cannot tell).
"""

from __future__ import annotations

from . import beit

NAME = "beitv2"
HELP = "BEiT v2: microsoft/unilm beit2 .pth (with cls_pt_layers) -> hf_mim BEiT model with the CLS head"

add_arguments = beit.add_arguments


def convert(args):
    return beit.convert(args, method=NAME)

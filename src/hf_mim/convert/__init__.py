"""Converters from reference checkpoints to hf_mim ``save_pretrained`` directories."""

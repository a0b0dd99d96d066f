"""Weights from and to other libraries: Hugging Face GPT-2, BERT and T5 (`convert.hf`)."""
from transformer_jax.convert.hf import HFImport, load_hf, read_hf_config, read_state_dict, save_hf

__all__ = ["HFImport", "load_hf", "read_hf_config", "read_state_dict", "save_hf"]

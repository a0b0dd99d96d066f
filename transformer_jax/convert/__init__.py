"""Weights from and to other libraries: Hugging Face GPT-2, Llama, Mistral, Qwen2, BERT and T5
(`convert.hf`), and runs that start from or export to them (`convert.runs`)."""
from transformer_jax.convert.hf import HFImport, hf_model_config, load_hf, read_hf_config, read_state_dict, save_hf

__all__ = ["HFImport", "hf_model_config", "load_hf", "read_hf_config", "read_state_dict", "save_hf"]

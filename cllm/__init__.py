"""cllm: consistency LLMs and multi-token decoding (Jacobi, CLLM, MTAD) for any Hugging Face causal LM."""

__version__ = "0.1.0"

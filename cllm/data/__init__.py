"""Data: datasets and prompt files, chat formatting, the Jacobi trajectory store (`cllm gen` output)."""

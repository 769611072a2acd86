"""The training objectives: each turns trajectory records into packed examples and the index tensors its losses
read (cllm: the CLLM paper's; jacobi_forcing: Jacobi Forcing's clean-context packing; gated: the lossless gated
draft's)."""

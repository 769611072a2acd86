"""Training: packing trajectories for each objective (CLLM, Jacobi Forcing), the losses, the trainer, draft
distillation."""

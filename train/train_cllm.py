"""Train a consistency LLM on Jacobi trajectories.

    deepspeed --num_gpus N train/train_cllm.py --config configs/train/gsm8k_smollm2_lora.yaml [--max-steps 200 ...]
    torchrun --nproc_per_node N train/train_cllm.py --config ...      (or accelerate launch, or plain python)

Same options as `cllm train`.
"""

import sys

from cllm.cli import main as cli_main


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    args = [a for a in args if not a.startswith("--local_rank")]
    return cli_main(["train", *args])


if __name__ == "__main__":
    from cllm.distributed import exit_process

    exit_process(main())

"""Evaluate a checkpoint against its base model: speed-up, quality, where the speed comes from, plots.

    python decode/evaluate.py --model runs/train/gsm8k_lora --base-model smollm2-135m --dataset gsm8k --limit 100 \
        --methods ar,jacobi --out-dir runs/eval/gsm8k_lora
    torchrun --nproc_per_node 2 decode/evaluate.py ...   (each rank takes a disjoint share; rank 0 merges)

Same options as `cllm eval`. Run the same command again to resume an interrupted eval.
"""

import sys

from cllm.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["eval", *(sys.argv[1:] if argv is None else list(argv))])


if __name__ == "__main__":
    from cllm.distributed import exit_process

    exit_process(main())

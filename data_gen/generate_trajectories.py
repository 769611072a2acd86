"""Collect Jacobi trajectories: `python data_gen/generate_trajectories.py --config configs/data_gen/gsm8k.yaml`.

Same options as `cllm gen`; under `torchrun --nproc_per_node N` every rank writes its own shards.
"""

import sys

from cllm.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["gen", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from cllm.distributed import exit_process

    exit_process(main())

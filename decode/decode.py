"""Decode prompts with AR, Jacobi, SpS or MTAD: `python decode/decode.py --model smollm2-135m --prompt "Hi"`.

Same options as `cllm decode`; also runs under `torchrun --nproc_per_node N` (each rank takes a share).
"""

import sys

from cllm.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["decode", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from cllm.distributed import exit_process

    exit_process(main())

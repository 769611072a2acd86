"""Cut a small draft model out of the target and distil it, for `cllm decode --method sps|mtad --draft DIR`.

    python train/train_draft.py --config configs/draft/smollm2_draft.yaml [--max-steps 300 ...]
    python train/train_draft.py --model smollm2-135m --output-dir runs/draft/smoke --max-steps 5

Same options as `cllm train-draft`.
"""

import sys

from cllm.cli import main as cli_main


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    args = [a for a in args if not a.startswith("--local_rank")]
    return cli_main(["train-draft", *args])


if __name__ == "__main__":
    from cllm.distributed import exit_process

    exit_process(main())

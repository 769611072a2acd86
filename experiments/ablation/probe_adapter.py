"""The training probe of a config (jacobi_eval_prompts held-in, jacobi_eval_held_out held-out prompts) on an
adapter without training: step 0 of a run that continues one (`init_adapter`), or any adapter on another run's
held-out prompts.

    python experiments/ablation/probe_adapter.py CONFIG.yaml [ADAPTER_DIR]   (default: the config's init_adapter)
"""

import sys

from cllm.config import resolve
from cllm.training import run
from cllm.training.config import TrainConfig


def main(argv: list[str]) -> None:
    cfg = resolve(TrainConfig, {}, argv[0])
    if len(argv) > 1:
        cfg.init_adapter = argv[1]
    model, tok = run.build_model(cfg)
    _, _, records, held_out = run.build_dataset(cfg, tok, model.config.vocab_size)
    probe = run._jacobi_probe(cfg, records, tok, held_out)
    print(cfg.init_adapter, probe(model, cfg.jacobi_eval_steps))


if __name__ == "__main__":
    main(sys.argv[1:])

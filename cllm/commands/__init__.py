"""Sub-commands of the `cllm` console script; each module has `add_arguments(parser)` and `run(args)`."""

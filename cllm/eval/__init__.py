"""Evaluation: the measuring harness of `cllm decode` and `cllm eval` (measure.py: interleaved, timed rows), the
one report (summary.py), the eval run (runner.py), quality scores, the code sandbox, metrics, plots, energy."""

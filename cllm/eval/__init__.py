"""Evaluation: the harness (speed-up in one interleaved run), quality scores, the code sandbox, metrics, reports,
plots, energy."""

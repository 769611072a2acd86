"""The experiment tooling outside the library: the MTAD curve from an eval report with method variants."""

from __future__ import annotations

import json

import pytest

from cllm.errors import CllmError
from experiments.mtad_curve.plot import curve_markdown, curve_rows, main


def _report() -> dict:
    methods = {"base_ar": {"tokens_per_second": 20.0, "perplexity_base": 1.5},
               "ar": {"tokens_per_second": 20.0, "perplexity_base": 2.0},
               "sps": {"tokens_per_second": 15.0, "perplexity_base": 2.0, "block_efficiency": 1.4}}
    for b in (1, 4):
        for tau in (0.1, 0.9):
            methods[f"mtad:tau={tau}:beam_width={b}"] = {"tokens_per_second": 10.0 + b + 10 * (1 - tau),
                                                       "perplexity_base": 1.6 + tau / 10, "block_efficiency": 2 - tau}
    return {"settings": {"tau": 0.5, "beam_width": 4}, "methods": methods}


def test_curve_rows_table_and_plots(tmp_path):
    rows = curve_rows(_report())
    assert len(rows) == 6 and not any(r["method"] == "base_ar" for r in rows)
    mtad = {(r["tau"], r["beam_width"]): r for r in rows if r["kind"] == "mtad"}
    assert set(mtad) == {(0.1, 1), (0.9, 1), (0.1, 4), (0.9, 4)} and mtad[(0.1, 4)]["tokens_per_second"] == 23.0
    table = curve_markdown(rows)
    assert table.splitlines()[2].startswith("| ar |") and "| mtad | 0.1 | 1 | 20.00 | 1.610 | -19.5% | 1.900 |" in table
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    assert main([str(report), "--out", str(tmp_path / "out")]) == 0
    for png in ("perplexity_vs_speed.png", "block_efficiency_vs_tau.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CllmError, match="no mtad rows"):
        curve_rows({"settings": {}, "methods": {"ar": {}}})
    assert main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2

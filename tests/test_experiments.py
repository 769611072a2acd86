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
    methods["mtad:tau=0.5:beam_width=4:beam_weights=released"] = {"tokens_per_second": 9.0, "perplexity_base": 1.9,
                                                                 "block_efficiency": 1.2, "cpu_s_per_token": 0.25}
    return {"settings": {"tau": 0.5, "beam_width": 4}, "methods": methods}


def test_curve_rows_table_and_plots(tmp_path):
    rows = curve_rows(_report())
    assert len(rows) == 7 and not any(r["method"] == "base_ar" for r in rows)
    mtad = {(r["tau"], r["beam_width"]): r for r in rows if r["kind"] == "mtad" and r["beam_weights"] == "joint"}
    assert set(mtad) == {(0.1, 1), (0.9, 1), (0.1, 4), (0.9, 4)} and mtad[(0.1, 4)]["tokens_per_second"] == 23.0
    table = curve_markdown(rows)
    # by hand: 20 / 15 tok/s = 1.33x SpS; ppl 1.61 / 2.0 - 1 = -19.5%; block efficiency 1.9 / 1.4 = 1.36x SpS
    assert table.splitlines()[2].startswith("| ar |") and table.splitlines()[-1].startswith("| mtad (released")
    assert "| mtad | 0.1 | 1 | 20.00 | 1.33x | 1.610 | -19.5% | 1.900 | 1.36x | - | - |" in table
    assert "| mtad (released beam weights) | 0.5 | 4 | 9.00 | 0.60x | 1.900 | -5.0% | 1.200 | 0.86x | - | 0.2500 |" in table
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    assert main([str(report), "--out", str(tmp_path / "out")]) == 0
    for png in ("perplexity_vs_speed.png", "block_efficiency_vs_tau.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CllmError, match="no mtad rows"):
        curve_rows({"settings": {}, "methods": {"ar": {}}})
    assert main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2

"""The one measuring harness of `cllm decode` and `cllm eval`: every method on the same prompts, its order rotated
from one prompt (or batch) to the next so that no method always runs first, each call timed (wall clock, CPU time,
RAPL energy where readable), and one row per (prompt, method) in the schema `cllm.eval.summary` reports.

A row holds `result_row`'s fields plus `method`, `seconds`, `cpu_seconds`, `joules`, `machine`, `run` and the
untimed quality fields `base_logprob_mean`, `correct`, `degenerate`. A batch of several prompts is timed as one
call; each of its rows gets the share of the call's time and energy that its new tokens are of the batch's.
"""

from __future__ import annotations

import time


def rotated(methods: list[str], k: int) -> list[str]:
    """The methods in the order the k-th prompt (or batch) runs them."""
    k %= len(methods)
    return methods[k:] + methods[:k]


def timed(call):
    """(call()'s result, {"seconds", "cpu_seconds", "joules"}) of one decode call."""
    from cllm.eval.energy import EnergyMeter

    meter = EnergyMeter()  # RAPL package energy where readable; joules None elsewhere
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    result = call()
    timing = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    meter.stop()
    timing["joules"] = meter.joules
    return result, timing


def rows_of(method: str, indexed: list[tuple[int, object]], results: list, timing: dict, stamp: dict) -> list[dict]:
    """One row per prompt of a timed call: `indexed` is [(prompt index, record)], `results` the DecodeResults."""
    from cllm.eval.report import result_row

    total = sum(r.n_new_tokens for r in results)
    rows = []
    for (i, rec), res in zip(indexed, results):
        share = res.n_new_tokens / total if total else 1 / len(results)
        row = result_row(i, rec, res)
        row.update(method=method, **{k: None if v is None else v * share for k, v in timing.items()}, **stamp)
        rows.append(row)
    return rows


def add_quality(row: dict, logprobs: list[float] | None, correct: bool | None) -> dict:
    """The untimed fields: the output's mean log-probability under the scoring model (None: not scored), whether it
    is right (None: nothing to tell), whether it loops."""
    from cllm.eval.quality import is_degenerate

    row["base_logprob_mean"] = sum(logprobs) / len(logprobs) if logprobs else None
    row["correct"] = correct
    row["degenerate"] = is_degenerate(row["token_ids"])
    return row


def stamp() -> dict:
    """What every row of one run carries: the machine (a resumed eval may span machines) and the run's id."""
    import os
    import uuid

    from cllm.machine import machine_tag

    return {"machine": machine_tag(),
            "run": f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"}

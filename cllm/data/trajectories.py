"""Jacobi trajectory collection (`cllm gen`): batched, KV-cached, sharded, written incrementally, resumable.

Decoding is `jacobi_decode(..., record_trajectory=True)`, the same iteration `cllm decode` runs. One record per
(prompt, block):
  data_id      stable index of the prompt in its source
  prompt_id    the source's own id
  block_index  0, 1, ...
  prompt_ids   the prompt plus the fixed points of earlier blocks (the context the block was decoded on)
  prompt_len   length of the original prompt
  states       y(0) .. y(k): every iteration's input state, the last one reaches the fixed point in one step
  fixed_point  y*, n ids (fewer only in the block where EOS ended the answer; its states are cut to match)
  label_ids    optional ground-truth answer ids (GSM8K solution, Spider SQL), the same on every block of a prompt
  aug_states   optional CLLM augmentation: states with part of their wrong tokens replaced by y* tokens

Layout of an output folder:
  manifest.json                       the config that made the data (a resume with another config is refused)
  part-<worker>-<k>.jsonl             records, appended batch by batch
  progress-<worker>.jsonl             one line per committed batch: its prompts, file and end offset, counts
A batch's records are appended and fsynced first, then its progress line: after a kill at any point, the
records past the last progress line are cut away on restart and those prompts are decoded again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cllm.config import opt
from cllm.data.datasets import read_json
from cllm.errors import CllmError
from cllm.models import DEFAULT_MODEL

FORMAT = "cllm-trajectories/1"
# Keys that change the data; an existing output folder must agree on all of them.
FINGERPRINT_KEYS = (
    "model", "adapter", "dtype", "dataset", "split", "prompts", "prompt_field", "template", "block_size",
    "max_new_tokens", "init", "seed", "labels", "augment", "augment_fraction", "repeat_threshold",
    "max_states_per_block", "max_prompt_tokens", "on_long_prompt", "n_workers",
)
DECODERS = ("jacobi", "gated")


@dataclass
class GenConfig:
    model: str = opt(DEFAULT_MODEL, "model spec: alias, local folder, HF id or .gguf")
    adapter: str | None = opt(None, "optional PEFT adapter merged into the model (a gated one is loaded gated, for "
                                    "--decoder gated)")
    decoder: str = opt("jacobi", "whose states to record: jacobi (the model's Jacobi trajectories) or gated[:OPTION=VALUE"
                                 "...] (on-policy: the guesses a gated --adapter's draft reads under gated decoding, "
                                 "blocks of block_size - 1 tokens; options as in `cllm eval --methods`)")
    dtype: str = opt("fp32", "fp32 gives the model's exact greedy fixed points; bf16 is faster (its own fixed points)",
                     ("fp32", "bf16", "fp16", "fp64"))
    device: str | None = opt(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    dataset: str | None = opt(None, "gsm8k, spider, sharegpt, code, code_stdlib, spec_bench, mt_bench, vicuna_bench, "
                                    "humaneval")
    split: str | None = opt(None, "dataset split (gsm8k: train|test)")
    data_dir: str | None = opt(None, "dataset root (default: $CLLM_DATA_DIR or ../shared/data)")
    prompts: str | None = opt(None, "JSONL prompt file instead of --dataset")
    prompt_field: str = opt("prompt", "field of --prompts that holds the prompt")
    template: str | None = opt(None, "build the prompt from a --prompts line, e.g. 'Q: {question}\\nA:'")
    on_bad_record: str = opt("fail", "a malformed --prompts line: fail (error naming file:line) or skip (counted)",
                             ("fail", "skip"))
    limit: int | None = opt(None, "number of prompts (after --offset)")
    offset: int = opt(0, "skip this many prompts of the source first")
    block_size: int = opt(16, "Jacobi block size n")
    max_new_tokens: int = opt(256, "new tokens per prompt, at most; a multiple of block_size")
    max_states_per_block: int = opt(0, "iteration cap: keep at most this many states per block, evenly spaced "
                                       "with y(0) and the last state kept (0 = all)")
    init: str = opt("prompt", "initial guess: random prompt tokens (CLLM), repeat last token, pad",
                    ("prompt", "repeat", "pad"))
    seed: int = opt(0, "seed for initial guesses and augmentation (per prompt: seed and data_id)")
    batch_size: int = opt(8, "prompts decoded together")
    labels: bool = opt(False, "store ground-truth answers (GSM8K solution, Spider SQL) as label_ids")
    augment: bool = opt(False, "CLLM augmentation: add aug_states with part of the wrong tokens fixed")
    augment_fraction: float = opt(0.5, "share of a state's wrong tokens replaced by fixed-point tokens")
    repeat_threshold: int = opt(10, "drop blocks whose fixed point has this many equal tokens in a row (0 = keep all)")
    max_prompt_tokens: int | None = opt(None, "longest prompt (default: model context minus max_new_tokens)")
    on_long_prompt: str = opt("skip", "a prompt that is too long: skip (counted) or truncate (keep its end)",
                              ("skip", "truncate"))
    out: str | None = opt(None, "output folder")
    overwrite: bool = opt(False, "delete this worker's earlier output and start over")
    shard_records: int = opt(5000, "records per part file before a new one starts")
    num_shards: int = opt(1, "job-array size: split the prompts into this many disjoint shards")
    shard_index: int = opt(0, "which job-array shard this process is (0-based)")

    def validate(self) -> None:
        if (self.dataset is None) == (self.prompts is None):
            raise CllmError("give exactly one of --dataset NAME or --prompts FILE")
        if not self.out:
            raise CllmError("--out DIR is required")
        for name in ("block_size", "max_new_tokens", "batch_size", "shard_records", "num_shards"):
            if getattr(self, name) < 1:
                raise CllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens % self.block_size:
            raise CllmError(f"--max-new-tokens ({self.max_new_tokens}) must be a multiple of --block-size "
                            f"({self.block_size}) so that every block has n tokens")
        if not 0 <= self.shard_index < self.num_shards:
            raise CllmError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.offset < 0 or (self.limit is not None and self.limit < 1):
            raise CllmError("--offset must be >= 0 and --limit >= 1")
        if not 0.0 < self.augment_fraction <= 1.0:
            raise CllmError(f"--augment-fraction must be in (0, 1], got {self.augment_fraction}")
        if self.repeat_threshold < 0 or self.max_states_per_block < 0:
            raise CllmError("--repeat-threshold and --max-states-per-block must be >= 0")
        self._check_decoder()

    def _check_decoder(self) -> None:
        from cllm.decoding.registry import split_variant

        base = self.decoder.split(":")[0]
        if base not in DECODERS:
            raise CllmError(f"--decoder must be one of {', '.join(DECODERS)} (with gated options), got {self.decoder!r}")
        if base == "jacobi" and self.decoder != "jacobi":
            raise CllmError(f"--decoder jacobi takes no options (--block-size, --init set them), got {self.decoder!r}")
        if base == "gated":
            split_variant(self.decoder)  # its options are known and well typed
            if not self.adapter:
                raise CllmError("--decoder gated records a gated adapter's guesses: give --adapter")
            if self.block_size < 2:
                raise CllmError("--decoder gated needs --block-size >= 2 (its guess is block_size - 1 tokens)")


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (tested without a model)


def longest_run(ids: list[int]) -> int:
    """Length of the longest run of one repeated id."""
    best = run = 0
    prev = None
    for t in ids:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def is_degenerate(token_ids: list[int], min_span: int = 40, max_period: int = 20) -> bool:
    """True when some span of >= min_span tokens satisfies t[i] == t[i + p] throughout, for a period p <= max_period
    (a loop, as the eval's repeat rate counts it; `longest_run` sees only a period of 1)."""
    n = len(token_ids)
    for p in range(1, max_period + 1):
        run = 0
        for i in range(n - p):
            run = run + 1 if token_ids[i] == token_ids[i + p] else 0
            if run + p >= min_span:
                return True
    return False


def thin_states(states: list[list[int]], cap: int) -> list[list[int]]:
    """At most `cap` states, evenly spaced, always keeping the first and the last (cap 0 keeps all)."""
    if cap <= 0 or len(states) <= cap:
        return states
    if cap == 1:
        return [states[-1]]
    idx = sorted({round(i * (len(states) - 1) / (cap - 1)) for i in range(cap)})
    return [states[i] for i in idx]


def tile_guesses(guesses: list, token_ids: list[int]) -> list:
    """Consecutive blocks covering `token_ids` from a gated decode's overlapping guesses (`BlockTrajectory`s, in
    order, one state each): a guess is kept when it starts at or after the end of the last one kept (cut to its
    fixed point); the text between kept guesses becomes blocks of at most the guess width whose state is their
    fixed point (noise 0: they carry the context, the objectives train nothing on them). Packing needs whole
    responses of consecutive blocks, hence the tiling."""
    from cllm.decoding.common import BlockTrajectory

    width = max((len(g.states[0]) for g in guesses), default=1)
    out: list = []

    def fill(lo: int, hi: int) -> None:
        for a in range(lo, hi, width):
            piece = list(token_ids[a : min(a + width, hi)])
            out.append(BlockTrajectory(len(out), a, [piece], piece))

    pos = 0
    for g in guesses:
        m = len(g.fixed_point)
        if g.start < pos or m == 0:
            continue
        fill(pos, g.start)
        out.append(BlockTrajectory(len(out), g.start, [list(g.states[0][:m])], list(g.fixed_point)))
        pos = g.start + m
    fill(pos, len(token_ids))
    return out


def augment_state(state: list[int], fixed_point: list[int], fraction: float, gen) -> list[int] | None:
    """CLLM augmentation: replace ceil(fraction * k) of the k wrong tokens with fixed-point tokens, keeping at least
    one wrong token (a state equal to y* teaches nothing). None when fewer than two tokens are wrong."""
    wrong = [i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b]
    if len(wrong) < 2:
        return None
    n_fix = min(len(wrong) - 1, max(1, math.ceil(fraction * len(wrong))))
    import torch

    pick = torch.randperm(len(wrong), generator=gen)[:n_fix].tolist()
    out = list(state)
    for p in pick:
        out[wrong[p]] = fixed_point[wrong[p]]
    return out


def block_records(data_id: int, prompt_id: str, prompt: list[int], result, cfg: GenConfig,
                  label_ids: list[int] | None) -> tuple[list[dict], int]:
    """Records of one decoded prompt and how many blocks the repetition filter dropped."""
    records, dropped = [], 0
    import torch  # here, not at module level: `cllm gen --help` and config code load no torch

    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + data_id)
    for block in result.trajectory:
        fp = block.fixed_point
        if cfg.repeat_threshold and longest_run(fp) >= cfg.repeat_threshold:
            dropped += 1
            continue
        # Positions after EOS are never decoded: cut the states to the fixed point's length.
        states = [s[: len(fp)] for s in thin_states(block.states, cfg.max_states_per_block)]
        rec = {
            "data_id": data_id,
            "prompt_id": prompt_id,
            "block_index": block.block_index,
            "prompt_ids": prompt + result.token_ids[: block.start],
            "prompt_len": len(prompt),
            "states": states,
            "fixed_point": fp,
        }
        if label_ids is not None:
            rec["label_ids"] = label_ids
        if cfg.augment:
            aug = [augment_state(s, fp, cfg.augment_fraction, gen) for s in states]
            rec["aug_states"] = [a for a in aug if a is not None]
        records.append(rec)
    return records, dropped


# ----------------------------------------------------------------------------------------------------------------
# Output folder: manifest, part files, progress log


def fingerprint(cfg: GenConfig, n_workers: int) -> dict:
    values = {k: getattr(cfg, k) for k in FINGERPRINT_KEYS if k != "n_workers"}
    if cfg.decoder != "jacobi":  # only then: folders collected before the option resume unchanged
        values["decoder"] = cfg.decoder
    if values["prompts"]:
        values["prompts"] = str(Path(values["prompts"]).resolve())
    values["n_workers"] = n_workers
    return values


def check_or_write_manifest(out: Path, fp: dict, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    manifest = {"format": FORMAT, "config": fp}
    if path.is_file() and not overwrite:
        old = read_json(path, "trajectory manifest", "; use --overwrite to start over or another --out")
        if old.get("format") != FORMAT:
            raise CllmError(f"{out} is not a cllm trajectory folder (manifest format {old.get('format')!r})")
        diff = [k for k in sorted(set(fp) | set(old["config"])) if old["config"].get(k) != fp.get(k)]
        if diff:
            k = diff[0]
            raise CllmError(
                f"{out} holds trajectories made with another config ({k}: {old['config'].get(k)!r} there, "
                f"{fp.get(k)!r} now); use --overwrite to start over or another --out"
            )
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise CllmError(f"no trajectory manifest in {out} (not a `cllm gen` output folder)")
    manifest = read_json(path, "trajectory manifest")
    if manifest.get("format") != FORMAT:
        raise CllmError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest


def _read_progress(path: Path) -> tuple[list[dict], int]:
    """Committed progress lines and the byte length they span (a torn last line is not committed)."""
    entries, end = [], 0
    if not path.is_file():
        return entries, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            end += len(raw)
    return entries, end


class ShardStore:
    """One worker's part files and progress log in an output folder."""

    def __init__(self, out: Path, tag: str, shard_records: int, overwrite: bool = False):
        self.out, self.tag, self.shard_records = out, tag, shard_records
        self.progress_path = out / f"progress-{tag}.jsonl"
        if overwrite:
            for p in [self.progress_path, *self._parts()]:
                p.unlink(missing_ok=True)
        self.entries, end = _read_progress(self.progress_path)
        self.repaired_bytes = self._repair(end)
        last = self.entries[-1] if self.entries else None
        self.part_index = last["part"] if last else 0
        self.part_records = sum(e["n_records"] for e in self.entries if e["part"] == self.part_index)

    def _parts(self) -> list[Path]:
        return sorted(self.out.glob(f"part-{self.tag}-*.jsonl"))

    def _part_path(self, k: int) -> Path:
        return self.out / f"part-{self.tag}-{k:05d}.jsonl"

    def _repair(self, progress_end: int) -> int:
        """Cut the progress log to its committed lines and every part file to its committed bytes."""
        dropped = 0
        if self.progress_path.is_file() and self.progress_path.stat().st_size > progress_end:
            dropped += self.progress_path.stat().st_size - progress_end
            os.truncate(self.progress_path, progress_end)
        committed: dict[str, int] = {}
        for e in self.entries:
            committed[e["file"]] = e["offset"]
        for p in self._parts():
            keep = committed.get(p.name, 0)
            size = p.stat().st_size
            if size > keep:
                dropped += size - keep
                if keep == 0:
                    p.unlink()
                else:
                    os.truncate(p, keep)
        return dropped

    def done_ids(self) -> set[int]:
        return {i for e in self.entries for i in e["data_ids"]} | {int(i) for e in self.entries for i in e["skipped"]}

    def commit(self, records: list[dict], data_ids: list[int], skipped: dict, stats: dict) -> None:
        if self.part_records >= self.shard_records:
            self.part_index += 1
            self.part_records = 0
        part = self._part_path(self.part_index)
        with open(part, "ab") as f:
            for r in records:
                f.write((json.dumps(r, separators=(",", ":")) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            offset = f.tell()
        entry = {"data_ids": data_ids, "skipped": {str(k): v for k, v in skipped.items()}, "part": self.part_index,
                 "file": part.name, "offset": offset, "n_records": len(records), **stats}
        with open(self.progress_path, "ab") as f:
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)
        self.part_records += len(records)


def committed_files(out: str | Path) -> list[tuple[Path, int]]:
    """(part file, committed byte length) of every worker in an output folder."""
    out = Path(out)
    read_manifest(out)
    spans: dict[Path, int] = {}
    for prog in sorted(out.glob("progress-*.jsonl")):
        entries, _ = _read_progress(prog)
        for e in entries:
            spans[out / e["file"]] = e["offset"]
    return sorted(spans.items())


def load_trajectories(out: str | Path) -> list[dict]:
    """Every committed record of all workers, sorted by (data_id, block_index). Works on an interrupted run too."""
    records = []
    for path, end in committed_files(out):
        with open(path, "rb") as f:
            data = f.read(end)
        records.extend(json.loads(line) for line in data.splitlines() if line.strip())
    records.sort(key=lambda r: (r["data_id"], r["block_index"]))
    return records


def first_prompts_cpu_seconds(out: str | Path, n: int) -> float:
    """Collection CPU seconds of the n first prompts (as `--max-prompts n` picks them) of a trajectory folder.

    Each committed batch counts in proportion to its prompts among them: exact when no batch straddles the cut
    (the folder was first collected with --limit n and extended later), an even split of that batch otherwise.
    """
    entries = [e for prog in sorted(Path(out).glob("progress-*.jsonl")) for e in _read_progress(prog)[0]]
    keep = first_ids((i for e in entries for i in e["data_ids"]), n)
    return sum(e.get("cpu_seconds", 0.0) * sum(i in keep for i in e["data_ids"]) / len(e["data_ids"])
               for e in entries if e["data_ids"])


def summarize(out: str | Path) -> dict:
    """Totals over every worker's progress log (so a resumed run reports the whole job)."""
    out = Path(out)
    totals = {"prompts_done": 0, "prompts_skipped": 0, "skipped_reasons": {}, "blocks_kept": 0, "blocks_dropped": 0,
              "iterations": 0, "blocks": 0, "new_tokens": 0, "forwards": 0, "state_tokens": 0, "records": 0,
              "seconds": 0.0, "cpu_seconds": 0.0}
    for prog in sorted(out.glob("progress-*.jsonl")):
        for e in _read_progress(prog)[0]:
            totals["prompts_done"] += len(e["data_ids"])
            totals["prompts_skipped"] += len(e["skipped"])
            for reason in e["skipped"].values():
                totals["skipped_reasons"][reason] = totals["skipped_reasons"].get(reason, 0) + 1
            for k in ("blocks_kept", "blocks_dropped", "iterations", "blocks", "new_tokens", "forwards",
                      "state_tokens", "seconds", "cpu_seconds"):
                totals[k] += e.get(k, 0)
            totals["records"] += e["n_records"]
    totals["mean_iterations_per_block"] = totals["iterations"] / totals["blocks"] if totals["blocks"] else None
    totals["tokens_per_forward"] = totals["new_tokens"] / totals["forwards"] if totals["forwards"] else None
    totals["seconds"] = round(totals["seconds"], 2)
    totals["cpu_seconds"] = round(totals["cpu_seconds"], 2)  # process CPU time (all threads) of every batch
    return totals


def data_id_order(i) -> tuple:
    """Sort key of data_ids: numeric ids in numeric order, then the others as text."""
    return (0, i, "") if isinstance(i, int) else (1, 0, str(i))


def first_ids(ids, n: int) -> set:
    """The n first data_ids (by `data_id_order`): what --max-prompts keeps."""
    return set(sorted(set(ids), key=data_id_order)[:n])


def responses(out: str | Path) -> list[list[int]]:
    """The whole responses of a trajectory folder: each prompt's fixed points joined in block order (the base's
    greedy response, as far as the collection went), in data_id order."""
    by_id: dict[int, list[list[int]]] = {}
    for r in load_trajectories(out):
        by_id.setdefault(r["data_id"], []).append(r["fixed_point"])
    return [[t for block in blocks for t in block] for _, blocks in sorted(by_id.items())]

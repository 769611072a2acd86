"""The packed batch: what every objective's collator produces and `CllmTrainer` reads, and the padding both use.

An objective (CLLM: `objectives.cllm.PackedCollator`; Jacobi Forcing: `objectives.jacobi_forcing.JacobiForcingCollator`) packs
each example into one sequence whose single forward gives every logit its losses need, and pads a batch into
these keys (B examples, T packed tokens, K consistency slots: n for CLLM, J*n for J blocks of Jacobi Forcing,
A AR pairs):

    input_ids, position_ids        (B, T)   right-padded; positions run on past a row's end
    attention_mask                 (B, 1, T, T) additive (0 = visible, dtype min = hidden)
    student_idx, teacher_idx       (B, K)   slot i of a block: the logits predicting its token i
    cons_student_idx, cons_teacher_idx, block_mask
                                   (B, K)   the consistency term's logit pairs and which of them count
    real_mask                      (B, K)   the real slots (a short last block leaves some empty)
    fixed_point, state             (B, K) or (B, J, n)  each block's fixed point and trajectory state
    n_blocks                       (B,)     blocks packed per example (the released JF trainer divides by it)
    clean_context                  ()       bool: a student block's context is committed text
    ar_idx, ar_target, ar_mask     (B, A)   the AR loss's logit positions, targets and real pairs

A new objective is a dataset plus a collator that honours this contract (`check_packed_batch` says what is off).
"""

from __future__ import annotations

import torch

PACKED_BATCH_KEYS = ("input_ids", "position_ids", "attention_mask", "student_idx", "teacher_idx",
                     "cons_student_idx", "cons_teacher_idx", "block_mask", "real_mask", "fixed_point", "state",
                     "n_blocks", "clean_context", "ar_idx", "ar_target", "ar_mask")


def pad_rows(rows: list[list], width: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """(B, width): each row's values, right-padded with 0 (False)."""
    out = torch.zeros(len(rows), width, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def pad_stream(packed: list[dict], segment_key: str, pad_token_id: int, pad_segment: int):
    """(input_ids, segment ids, position_ids), each (B, T), from packed examples' `ids`, `segment_key` and `pos`.
    Padding gets `pad_token_id`, `pad_segment` (which the mask hides) and positions continuing past the row's end."""
    B, T = len(packed), max(len(p["ids"]) for p in packed)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    segments = torch.full((B, T), pad_segment, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(packed):
        L = len(p["ids"])
        input_ids[b, :L] = torch.tensor(p["ids"])
        segments[b, :L] = torch.tensor(p[segment_key])
        position_ids[b, :L] = torch.tensor(p["pos"])
        position_ids[b, L:] = torch.arange(T - L) + (max(p["pos"]) + 1)
    return input_ids, segments, position_ids


def check_packed_batch(batch: dict) -> None:
    """Raise ValueError naming the first key that is missing or whose shape breaks the contract."""
    missing = [k for k in PACKED_BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"packed batch lacks {missing}")
    B, T = batch["input_ids"].shape
    shapes = {"position_ids": (B, T), "attention_mask": (B, 1, T, T), "n_blocks": (B,), "clean_context": ()}
    K = batch["student_idx"].shape[1]
    shapes.update({k: (B, K) for k in ("teacher_idx", "cons_student_idx", "cons_teacher_idx", "block_mask",
                                       "real_mask")})
    A = batch["ar_idx"].shape[1]
    shapes.update({"ar_target": (B, A), "ar_mask": (B, A)})
    for key, shape in shapes.items():
        if tuple(batch[key].shape) != shape:
            raise ValueError(f"packed batch {key} has shape {tuple(batch[key].shape)}, expected {shape}")
    for key in ("fixed_point", "state"):
        if batch[key].shape[0] != B or batch[key][0].numel() != K:
            raise ValueError(f"packed batch {key} has shape {tuple(batch[key].shape)}: not (B, K) or (B, J, n)")

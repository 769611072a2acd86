"""The CLLM objective's training examples from `cllm gen` output, packed so that ONE forward pass gives every logit the CLLM loss needs.

One example is one trajectory state y(j) of one block. It is packed as

    [prompt][generated context][y* (fixed point)][y(j)][y(j+1) (local consistency only)][labels (optional)]

with position ids restarting where a segment stands in for the same text positions (y*, y(j) and y(j+1) all
sit right after the context) and a segment-aware causal mask: each block segment sees the whole context and
itself, never another block segment; the labels segment sees the prompt and itself. The logits at the last
context token and along y* are then exactly q(. | ctx, y*) (teacher for global consistency, with gradient for
the AR loss), the ones along y(j) exactly q(. | ctx, y(j)) (the student); the teacher is detached in the loss.
Compared with separate passes this costs one forward and one backward over n (or 2n) extra tokens.
"""

from __future__ import annotations

import random

import torch

from cllm.errors import CllmError
from cllm.training.batch import pad_rows, pad_stream

# Segment ids of the packed sequence.
PROMPT, CONTEXT, FIXED, STATE, NEXT, LABELS, PAD = 0, 1, 2, 3, 4, 5, -1


class TrajectoryDataset(torch.utils.data.Dataset):
    """Examples = (record, state). `state_sampling="uniform"` draws one state of a record per epoch (the paper);
    "all" makes every state its own example. States equal to y* (nothing to learn) are skipped.

    The draw is a function of (seed, epoch, example), not of a global random stream: a run resumed from any
    checkpoint, or run twice, trains on the same states (the Trainer's data loader calls `set_epoch`)."""

    def __init__(self, records: list[dict], state_sampling: str = "uniform", consistency: str = "global",
                 use_aug: bool = False, seed: int = 0):
        if state_sampling not in ("uniform", "all"):
            raise CllmError(f"state_sampling must be uniform or all, got {state_sampling!r}")
        self.records = records
        self.state_sampling, self.consistency, self.use_aug = state_sampling, consistency, use_aug
        self.seed, self.epoch = seed, 0
        self.items: list[tuple[int, int | None]] = []
        for i, r in enumerate(records):
            n_states = len(self._states(r))
            if n_states == 0:
                continue
            if state_sampling == "all":
                self.items.extend((i, j) for j in range(n_states))
            else:
                self.items.append((i, None))
        if not self.items:
            raise CllmError("no trainable states in the data (every state already equals its fixed point)")

    def _states(self, r: dict) -> list[list[int]]:
        states = [s for s in r["states"] if s != r["fixed_point"]]
        if self.use_aug:
            states += r.get("aug_states", [])
        return states

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draw(self, idx: int, n_states: int) -> int:
        """The state index example `idx` trains on this epoch: uniform, and the same in every run with the seed."""
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + idx).randrange(n_states)

    def __getitem__(self, idx: int) -> dict:
        rec_idx, j = self.items[idx]
        r = self.records[rec_idx]
        states = self._states(r)
        if j is None:
            j = self.draw(idx, len(states))
        state = states[j]
        nxt = None
        if self.consistency == "local":
            # The successor in the recorded trajectory (y* after the last state); augmented states use y*.
            k = r["states"].index(state) if state in r["states"] else len(r["states"]) - 1
            nxt = r["states"][k + 1] if k + 1 < len(r["states"]) else r["fixed_point"]
        return {"prompt_ids": r["prompt_ids"], "prompt_len": r["prompt_len"], "fixed_point": r["fixed_point"],
                "state": state, "next_state": nxt, "label_ids": r.get("label_ids")}


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """Allowed attention (B, T, T) from segment ids (B, T): causal, and a key is visible when it is in the query's
    own segment, in the prompt, or in the generated context for a block segment. Padding sees only itself."""
    q = seg.unsqueeze(-1)  # (B, T, 1)
    k = seg.unsqueeze(-2)  # (B, 1, T)
    T = seg.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    block_query = (q == FIXED) | (q == STATE) | (q == NEXT) | (q == CONTEXT)
    visible = (k == q) | ((k == PROMPT) & (q != PAD)) | ((k == CONTEXT) & block_query)
    eye = torch.eye(T, dtype=torch.bool, device=seg.device)
    return (causal & visible) | eye


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D additive attention mask (B, 1, T, T) from allowed pairs (B, T, T): 0 where allowed, dtype-min elsewhere."""
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype)
    return mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)


CONSISTENCY_POSITIONS = ("original", "block")
AR_SCOPES = ("prompt_and_answer", "answer")


def check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise CllmError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def first_mismatch(state: list[int], fixed_point: list[int]) -> int:
    """Index of the first token where the state differs from the fixed point (its length if none)."""
    return next((i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b), len(fixed_point))


class PackedCollator:
    """Pads packed examples into a batch: input_ids, position_ids, a 4D additive attention mask and the index
    tensors that pick student, teacher and AR logits. B > 1 is supported (right padding).

    `consistency_positions`: "original" (the released CLLM trainer) counts the logits from the one predicting the
    first mismatched token of the state to the end of the block (the earlier ones see the same context as the
    teacher's, so their divergence is 0 and they only dilute the mean); "block" counts all n.
    `ar_scope`: "prompt_and_answer" (both released trainers) adds the next-token pairs of the prompt and of the
    generated context to the AR loss; "answer" keeps the block's (or the labels') only, the paper's L_AR, which
    conditions on the prompt. The released CLLM trainer takes the whole answer as AR target; a packed example
    holds the answer up to the end of its block, so the pairs after it are not in this one."""

    def __init__(self, pad_token_id: int, block_size: int, ar_target: str = "fixed_point",
                 mask_dtype: torch.dtype = torch.float32, consistency_positions: str = "original",
                 ar_scope: str = "prompt_and_answer"):
        check_choice("ar_target", ar_target, ("fixed_point", "labels"))
        check_choice("consistency_positions", consistency_positions, CONSISTENCY_POSITIONS)
        check_choice("ar_scope", ar_scope, AR_SCOPES)
        self.pad_token_id, self.n, self.ar_target, self.mask_dtype = pad_token_id, block_size, ar_target, mask_dtype
        self.consistency_positions, self.ar_scope = consistency_positions, ar_scope

    def pack(self, ex: dict) -> dict:
        ctx, p_len, fp, st = ex["prompt_ids"], ex["prompt_len"], ex["fixed_point"], ex["state"]
        m, Lc = len(fp), len(ctx)
        ids = list(ctx) + list(fp) + list(st)
        seg = [PROMPT] * p_len + [CONTEXT] * (Lc - p_len) + [FIXED] * m + [STATE] * m
        pos = list(range(Lc)) + list(range(Lc, Lc + m)) * 2
        fixed_at, state_at = Lc, Lc + m
        # logits at the last context token and along a block segment predict the block's tokens.
        teacher_idx = [Lc - 1] + [fixed_at + i for i in range(m - 1)]
        student_idx = [Lc - 1] + [state_at + i for i in range(m - 1)]
        if ex.get("next_state") is not None:
            next_at = len(ids)
            ids += list(ex["next_state"])
            seg += [NEXT] * m
            pos += list(range(Lc, Lc + m))
            teacher_idx = [Lc - 1] + [next_at + i for i in range(m - 1)]
        if self.ar_target == "labels" and ex.get("label_ids"):
            labels = list(ex["label_ids"])
            lab_at = len(ids)
            ids += labels
            seg += [LABELS] * len(labels)
            pos += list(range(p_len, p_len + len(labels)))
            ar_idx, ar_target = [p_len - 1] + [lab_at + i for i in range(len(labels) - 1)], labels
            lead = p_len  # the labels follow the prompt
        else:
            ar_idx, ar_target = [Lc - 1] + [fixed_at + i for i in range(m - 1)], list(fp)
            lead = Lc  # the block follows prompt + generated context
        if self.ar_scope == "prompt_and_answer":  # position t predicts token t + 1 of what precedes the answer
            ar_idx, ar_target = list(range(lead - 1)) + ar_idx, list(ctx[1:lead]) + ar_target
        first = first_mismatch(st, fp) if self.consistency_positions == "original" else 0
        return {"ids": ids, "seg": seg, "pos": pos, "teacher_idx": teacher_idx, "student_idx": student_idx,
                "fixed_point": list(fp), "state": list(st), "ar_idx": ar_idx, "ar_target": ar_target,
                "cons": [i >= first for i in range(m)]}

    def __call__(self, examples: list[dict]) -> dict:
        """The packed batch (`cllm.training.batch`): one block per example, so K = n."""
        packed = [self.pack(e) for e in examples]
        n, A = self.n, max(len(p["ar_target"]) for p in packed)
        input_ids, seg, position_ids = pad_stream(packed, "seg", self.pad_token_id, PAD)
        student_idx = pad_rows([p["student_idx"] for p in packed], n)
        teacher_idx = pad_rows([p["teacher_idx"] for p in packed], n)
        attention_mask = additive_mask(segment_mask(seg), self.mask_dtype)  # (B, 1, T, T)
        # The consistency term's logits are the student's and teacher's slots.
        return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
                "student_idx": student_idx, "teacher_idx": teacher_idx,
                "fixed_point": pad_rows([p["fixed_point"] for p in packed], n),
                "state": pad_rows([p["state"] for p in packed], n),
                "cons_student_idx": student_idx, "cons_teacher_idx": teacher_idx,
                "block_mask": pad_rows([p["cons"] for p in packed], n, torch.bool),
                "real_mask": pad_rows([[True] * len(p["fixed_point"]) for p in packed], n, torch.bool),
                "n_blocks": torch.ones(len(packed)), "clean_context": torch.tensor(True),
                "ar_idx": pad_rows([p["ar_idx"] for p in packed], A),
                "ar_target": pad_rows([p["ar_target"] for p in packed], A),
                "ar_mask": pad_rows([[True] * len(p["ar_target"]) for p in packed], A, torch.bool)}

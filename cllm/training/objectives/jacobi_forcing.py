"""Jacobi Forcing training data: whole responses packed as noisy/clean block pairs, one forward per example.

One example is one response of `cllm gen` output (all its blocks, in order). Block j has its fixed point c_j
and one noisy state k_j chosen by the progressive noise schedule. They are packed as

    [prompt][k_0][c_0][k_1][c_1] ...

k_j and c_j share position ids (both stand for the same text positions), and the noise-aware mask lets
- a prompt token see the prompt (causal);
- a noisy token of block j see the prompt, the noisy blocks k_<j and its own block causally;
- a clean token of block j see the prompt, the clean blocks c_<j and its own block causally.
Every visible key comes earlier in the packed order, so the mask is the packed causal mask restricted by stream.

`noisy_context="clean"` lets a noisy token of block j see the CLEAN blocks c_<j instead of k_<j: each noisy block
then branches off the clean stream, which is the condition single-block Jacobi decoding meets (its context is
committed text), so one forward gives the CLLM global loss of every block of a response. It is not in the paper
but in its released code (`soft_flexattn_cllm_trainer.py`, run by `train_clean_context_conditioned_cllm_*.sh`);
the paper's noisy context (`soft_flexattn_cllm_trainer_multiblock.py`) trains for multi-block decoding, where
earlier blocks are still being refined.

Logits: the clean stream is a plain causal pass over prompt + c_0 + c_1 ..., so the logits that predict c_j
(the last token before c_j, then c_j[0 .. m-2]) give the AR loss and, detached, the consistency teacher. The
noisy stream is a causal pass over prompt + k_0 + k_1 ...; its logits at the matching places (the last token
before k_j, then k_j[0 .. m-2]) are the student. With a clean context, block j's student is a causal pass over
prompt + c_<j + k_j (its first position is then the clean stream's, as in the CLLM packing).

Which logits the consistency term counts (`consistency_positions`):
- "original", the released trainers' rule: the logits AT k_j[t] against those at c_j[t] for t >= the first
  mismatch f of k_j with c_j, i.e. the predictions of tokens f+1 .. m, the last one being the next block's first
  token (the noisy-context trainer); the clean-context trainer drops the last offset (t < m-1, f taken over the
  first m-1 tokens).
- "block": the block's own m predictions from the one of token f on (slot i predicts token i), one position
  earlier than the released rule and without the next block's first token.
The AR loss is over the clean stream, plus the prompt's next-token pairs with `ar_scope="prompt_and_answer"`
(the released trainers; "answer" leaves them out, as the paper's L_AR conditions on the prompt).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from cllm.errors import CllmError
from cllm.training.batch import pad_rows, pad_stream
from cllm.training.objectives.cllm import AR_SCOPES, CONSISTENCY_POSITIONS, additive_mask, check_choice, first_mismatch

# Stream ids of the packed sequence.
PROMPT, NOISY, CLEAN, PAD = 0, 1, 2, -1


def noise_ratio(state: list[int], fixed_point: list[int]) -> float:
    """(m - index of the first mismatch with the fixed point) / m: 0 for the fixed point, 1 if token 0 is wrong."""
    m = len(fixed_point)
    return (m - first_mismatch(state, fixed_point)) / m


def noise_targets(n_blocks: int, window: int, shift: int = 0) -> list[float]:
    """t_j = linspace(0, 1, window)[(j + shift) mod window] for the blocks j of one response (cyclic schedule;
    the paper's is shift 0)."""
    if window < 1:
        raise CllmError(f"noise window must be >= 1, got {window}")
    grid = torch.linspace(0, 1, window).tolist() if window > 1 else [1.0]
    return [grid[(j + shift) % window] for j in range(n_blocks)]


def pick_state(states: list[list[int]], fixed_point: list[int], target: float) -> list[int]:
    """The trajectory state (fixed point included, as the noise-0 end) whose noise ratio is nearest `target`;
    ties go to the earlier (noisier) state."""
    candidates = [*states, list(fixed_point)]
    return min(candidates, key=lambda s: abs(noise_ratio(s, fixed_point) - target))


def group_responses(records: list[dict]) -> list[dict]:
    """Responses from block records: {data_id, prompt_ids, blocks: [{fixed_point, states}, ...]} in block order.

    A response keeps its blocks from block 0 while each block's context is the prompt plus the earlier fixed
    points; it stops at a gap (a block dropped by cleaning), since later blocks cannot be packed after it.
    """
    by_id: dict = defaultdict(list)
    for r in records:
        by_id[r["data_id"]].append(r)
    responses = []
    for data_id, recs in by_id.items():
        recs.sort(key=lambda r: r["block_index"])
        first = recs[0]
        prompt = list(first["prompt_ids"][: first["prompt_len"]])
        context = list(first["prompt_ids"])
        if first["block_index"] != 0 or context != prompt:
            continue  # block 0 was dropped: nothing packable
        blocks = []
        for r in recs:
            if list(r["prompt_ids"]) != context:
                break  # gap: this block was decoded after a block that is not in the data
            blocks.append({"fixed_point": list(r["fixed_point"]), "states": [list(s) for s in r["states"]]})
            context = context + list(r["fixed_point"])
        if blocks:
            responses.append({"data_id": data_id, "prompt_ids": prompt, "blocks": blocks,
                              "label_ids": first.get("label_ids")})
    if not responses:
        raise CllmError("no response in the data starts at block 0 (Jacobi Forcing packs whole responses)")
    return responses


class JacobiForcingDataset(torch.utils.data.Dataset):
    """`noise_shifts` examples per response: the prompt, the fixed points c_j and the noisy states k_j picked by
    the progressive schedule shifted by 0 .. noise_shifts-1 (deterministic, so a resumed run sees the same data).

    The paper's schedule (noise_shifts=1) gives block j of a response the same noise level in every epoch, so
    most of a block's states, its random initial state among them, are never trained on; noise_shifts=w shows
    every block at every level of the window once per epoch."""

    def __init__(self, records: list[dict], noise_window: int = 16, max_blocks: int | None = None,
                 max_prompt_tokens: int | None = None, noise_shifts: int = 1):
        if not 1 <= noise_shifts <= max(noise_window, 1):
            raise CllmError(f"noise_shifts must be in 1 .. noise_window ({noise_window}), got {noise_shifts}")
        self.responses = group_responses(records)
        if max_prompt_tokens:  # bound the memory of long prompts: keep their end
            for r in self.responses:
                r["prompt_ids"] = r["prompt_ids"][-max_prompt_tokens:]
        self.noise_window = noise_window
        self.max_blocks = max_blocks
        self.noise_shifts = noise_shifts

    def __len__(self) -> int:
        return len(self.responses) * self.noise_shifts

    def __getitem__(self, idx: int) -> dict:
        resp_idx, shift = divmod(idx, self.noise_shifts)
        resp = self.responses[resp_idx]
        blocks = resp["blocks"][: self.max_blocks] if self.max_blocks else resp["blocks"]
        targets = noise_targets(len(blocks), self.noise_window, shift)
        return {
            "prompt_ids": resp["prompt_ids"],
            "fixed_points": [b["fixed_point"] for b in blocks],
            "states": [pick_state(b["states"], b["fixed_point"], t) for b, t in zip(blocks, targets)],
        }


NOISY_CONTEXTS = ("noisy", "clean")


def check_noisy_context(noisy_context: str) -> None:
    check_choice("noisy_context", noisy_context, NOISY_CONTEXTS)


def noise_aware_mask(stream: torch.Tensor, block: torch.Tensor, noisy_context: str = "noisy") -> torch.Tensor:
    """Allowed attention (B, T, T) from per-token stream ids (B, T) and block indices (B, T), in packed order.

    Causal in the packed order, and a key is visible when it is in the prompt, or in the query's stream at a
    block index <= the query's; with noisy_context="clean" a noisy query sees the clean stream's earlier blocks
    and its own noisy block instead. Padding sees only itself.
    """
    check_noisy_context(noisy_context)
    qs, ks = stream.unsqueeze(-1), stream.unsqueeze(-2)  # (B, T, 1), (B, 1, T)
    qb, kb = block.unsqueeze(-1), block.unsqueeze(-2)
    T = stream.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=stream.device).tril()
    if noisy_context == "noisy":
        same_stream = (qs == ks) & ((qs == NOISY) | (qs == CLEAN)) & (kb <= qb)
    else:
        clean_q = (qs == CLEAN) & (ks == CLEAN) & (kb <= qb)
        noisy_q = (qs == NOISY) & (((ks == CLEAN) & (kb < qb)) | ((ks == NOISY) & (kb == qb)))
        same_stream = clean_q | noisy_q
    visible = ((ks == PROMPT) & (qs != PAD)) | same_stream
    eye = torch.eye(T, dtype=torch.bool, device=stream.device)
    return (causal & visible) | eye


class JacobiForcingCollator:
    """Packs responses into a batch with the keys `CllmTrainer` reads. Index tensors hold n slots per block
    (block j at j*n .. j*n+n-1; unused slots masked), so per-block metrics can reshape them to (B, J, n).

    `student_idx`/`teacher_idx` (B, J*n): slot i of a block predicts its token i (metrics, AR loss);
    `cons_student_idx`/`cons_teacher_idx` with `block_mask` (B, J*n) are the consistency term's pairs (see the
    module docstring), `real_mask` the real slots; `fixed_point`/`state` are (B, J, n); `n_blocks` (B,) the number
    of blocks of each example (the released trainer divides its consistency mean by it)."""

    def __init__(self, pad_token_id: int, block_size: int, mask_dtype: torch.dtype = torch.float32,
                 noisy_context: str = "noisy", consistency_positions: str = "original",
                 ar_scope: str = "prompt_and_answer"):
        check_noisy_context(noisy_context)
        check_choice("consistency_positions", consistency_positions, CONSISTENCY_POSITIONS)
        check_choice("ar_scope", ar_scope, AR_SCOPES)
        self.pad_token_id, self.n, self.mask_dtype = pad_token_id, block_size, mask_dtype
        self.noisy_context, self.consistency_positions, self.ar_scope = noisy_context, consistency_positions, ar_scope
        self.gate_noisy = False  # the gated objective (`cllm.training.gated`) adds a gate: 1 on the noisy stream

    def _consistency_pairs(self, k_at: int, c_at: int, st: list[int], fp: list[int], student: list[int],
                           teacher: list[int]):
        """(student positions, teacher positions, counted) of one block's m slots."""
        m = len(fp)
        if self.consistency_positions == "block":
            first = first_mismatch(st, fp)
            return student, teacher, [i >= first for i in range(m)]
        last = m - 1 if self.noisy_context == "clean" else m  # the clean-context trainer drops the last offset
        first = first_mismatch(st[:last], fp[:last])
        return ([k_at + t for t in range(m)], [c_at + t for t in range(m)],
                [first <= t < last for t in range(m)])

    def pack(self, ex: dict) -> dict:
        prompt = list(ex["prompt_ids"])
        P = len(prompt)
        ids, stream, block, pos = list(prompt), [PROMPT] * P, [0] * P, list(range(P))
        student_idx, teacher_idx, cons_s, cons_t, cons, real = [], [], [], [], [], []
        prev_noisy = prev_clean = P - 1  # the packed index whose logits predict the block's first token
        offset = P  # text position of the block's first token
        for j, (fp, st) in enumerate(zip(ex["fixed_points"], ex["states"])):
            m = len(fp)
            if m > self.n or len(st) != m:
                raise CllmError(f"block {j} has {m} tokens (state {len(st)}) but block_size is {self.n}")
            k_at = len(ids)
            ids += list(st)
            c_at = k_at + m
            ids += list(fp)
            stream += [NOISY] * m + [CLEAN] * m
            block += [j] * (2 * m)
            pos += list(range(offset, offset + m)) * 2
            pad = [0] * (self.n - m)
            s_slots = [prev_noisy] + [k_at + i for i in range(m - 1)]
            t_slots = [prev_clean] + [c_at + i for i in range(m - 1)]
            cs, ct, cm = self._consistency_pairs(k_at, c_at, st, fp, s_slots, t_slots)
            student_idx += s_slots + pad
            teacher_idx += t_slots + pad
            cons_s, cons_t, cons = cons_s + cs + pad, cons_t + ct + pad, cons + cm + [False] * len(pad)
            real += [True] * m + [False] * len(pad)
            # with a clean context the next noisy block's first token is predicted from the clean stream too
            prev_noisy = c_at + m - 1 if self.noisy_context == "clean" else c_at - 1
            prev_clean = c_at + m - 1
            offset += m
        lead = P - 1 if self.ar_scope == "prompt_and_answer" else 0  # the prompt's next-token pairs
        fps = [t for fp in ex["fixed_points"] for t in list(fp) + [0] * (self.n - len(fp))]
        return {"ids": ids, "stream": stream, "block": block, "pos": pos, "student_idx": student_idx,
                "teacher_idx": teacher_idx, "cons_student_idx": cons_s, "cons_teacher_idx": cons_t, "cons": cons,
                "real": real, "fixed_points": ex["fixed_points"], "states": ex["states"],
                "ar_idx": list(range(lead)) + teacher_idx, "ar_target": prompt[1:lead + 1] + fps,
                "ar_mask": [True] * lead + real}

    def __call__(self, examples: list[dict]) -> dict:
        """The packed batch (`cllm.training.batch`): J blocks of n slots per example, K = J * n."""
        packed = [self.pack(e) for e in examples]
        B, n = len(packed), self.n
        J = max(len(p["fixed_points"]) for p in packed)
        A = max(len(p["ar_idx"]) for p in packed)
        input_ids, stream, position_ids = pad_stream(packed, "stream", self.pad_token_id, PAD)
        block = pad_rows([p["block"] for p in packed], input_ids.shape[1])
        fixed_point = torch.zeros(B, J, n, dtype=torch.long)
        state = torch.zeros(B, J, n, dtype=torch.long)
        for b, p in enumerate(packed):
            for j, (fp, st) in enumerate(zip(p["fixed_points"], p["states"])):
                fixed_point[b, j, : len(fp)] = torch.tensor(fp)
                state[b, j, : len(st)] = torch.tensor(st)

        def rows(key, width, dtype=torch.long):  # (B, width)
            return pad_rows([p[key] for p in packed], width, dtype)

        # (B, 1, T, T), built once per batch
        attention_mask = additive_mask(noise_aware_mask(stream, block, self.noisy_context), self.mask_dtype)
        extra = {"gate": (stream == NOISY).float()} if self.gate_noisy else {}  # (B, T): a gated adapter's gate
        return {**extra, "input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
                "student_idx": rows("student_idx", J * n), "teacher_idx": rows("teacher_idx", J * n),
                "cons_student_idx": rows("cons_student_idx", J * n),
                "cons_teacher_idx": rows("cons_teacher_idx", J * n),
                "block_mask": rows("cons", J * n, torch.bool), "real_mask": rows("real", J * n, torch.bool),
                "fixed_point": fixed_point, "state": state,
                "n_blocks": torch.tensor([float(len(p["fixed_points"])) for p in packed]),
                "ar_idx": rows("ar_idx", A), "ar_target": rows("ar_target", A),
                "ar_mask": rows("ar_mask", A, torch.bool),
                "clean_context": torch.tensor(self.noisy_context == "clean")}

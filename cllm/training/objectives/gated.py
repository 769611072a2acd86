"""The gated objective: a gated LoRA adapter (`cllm.decoding.gate`) learns to draft, the base model stays the base.

Examples are Jacobi Forcing's clean-context packing (`cllm.training.objectives.jacobi_forcing`), `[prompt][k_0][c_0][k_1]
[c_1] ...`, where a noisy block k_j sees the prompt, the clean blocks c_<j and itself. The prompt and the clean
blocks run at gate 0 (the base, untouched: their K/V are what the decoder's cache holds), the noisy blocks at
gate 1 (base + adapter: the draft). The student is the draft's prediction at k_j[t] of token t+1, the teacher the
base's at c_j[t] in the same forward, for every t from the state's first mismatch on, the last one included (it
predicts the next block's first token, the base's own prediction there too). No AR term: the adapter cannot move
the base, whose greedy output the decoder keeps whatever the adapter learns; the fixed points are the base's
greedy output, so trajectories collected once with the base stay valid for every round.

`draft_input="mask"` trains the other form of the draft (`cllm.decoding.gated`): the noisy block is all mask
tokens, so the draft predicts the next tokens from the committed text alone.
"""

from __future__ import annotations

from cllm.training.objectives.jacobi_forcing import JacobiForcingCollator
from cllm.training.objectives.cllm import first_mismatch


class GatedCollator(JacobiForcingCollator):
    """Jacobi Forcing's clean-context batch plus `gate` (B, T), 1 on the noisy stream, with the draft's pairs."""

    def __init__(self, pad_token_id: int, block_size: int, draft_input: str = "guess", mask_token_id: int = 0):
        super().__init__(pad_token_id, block_size, noisy_context="clean", ar_scope="answer")
        self.gate_noisy = True
        self.draft_input, self.mask_token_id = draft_input, mask_token_id

    def _consistency_pairs(self, k_at: int, c_at: int, st: list[int], fp: list[int], student: list[int],
                           teacher: list[int]):
        """The draft's output at k_j[t] against the base's at c_j[t], for t from the first mismatch to the end."""
        m, first = len(fp), first_mismatch(st, fp)
        return [k_at + t for t in range(m)], [c_at + t for t in range(m)], [t >= first for t in range(m)]

    def pack(self, ex: dict) -> dict:
        if self.draft_input == "mask":
            ex = {**ex, "states": [[self.mask_token_id] * len(fp) for fp in ex["fixed_points"]]}
        return super().pack(ex)


GATE_META_KEYS = ("draft_input", "mask_token_id", "block_size")

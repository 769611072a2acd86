"""Decoders: one file each, one public function each, all returning `DecodeResult`s."""

from cllm.decoding.ar import ar_decode
from cllm.decoding.common import BlockTrajectory, DecodeResult
from cllm.decoding.jacobi import jacobi_decode
from cllm.decoding.mtad import mtad_decode
from cllm.decoding.multiblock import multiblock_decode
from cllm.decoding.speculative import speculative_decode

__all__ = ["ar_decode", "jacobi_decode", "speculative_decode", "mtad_decode", "multiblock_decode", "DecodeResult", "BlockTrajectory"]

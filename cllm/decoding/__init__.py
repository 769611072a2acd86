"""Decoders: one file each, one public function each, all returning `DecodeResult`s."""

from cllm.decoding.ar import ar_decode
from cllm.decoding.common import BlockTrajectory, DecodeResult
from cllm.decoding.jacobi import jacobi_decode

__all__ = ["ar_decode", "jacobi_decode", "DecodeResult", "BlockTrajectory"]

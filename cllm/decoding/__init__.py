"""Decoders: one file each, one public function each, all returning `DecodeResult`s; `registry` names them.

The decoders are imported on first access (PEP 562), so importing `cllm.decoding.registry` loads no torch.
"""

_EXPORTS = {
    "ar_decode": "cllm.decoding.ar",
    "jacobi_decode": "cllm.decoding.jacobi",
    "speculative_decode": "cllm.decoding.speculative",
    "mtad_decode": "cllm.decoding.mtad",
    "multiblock_decode": "cllm.decoding.multiblock",
    "lookahead_decode": "cllm.decoding.lookahead",
    "DecodeResult": "cllm.decoding.common",
    "BlockTrajectory": "cllm.decoding.common",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cllm.decoding' has no attribute {name!r}")

"""Sparse ops of the CLT trainer. Pure torch paths today (the specification and CPU path);
Triton kernels plug in behind the same public functions. Imports nothing from ``clt``."""

from . import buffers
from .batchtopk import batchtopk, batchtopk_mask, exact_topk_mask
from .codes import mask_to_codes, relu_codes
from .decode import DecoderLayout, check_codes, decoder_norms, sparse_decode, sparse_decode_many
from .jumprelu import jumprelu, jumprelu_codes, jumprelu_step
from .molt import molt_apply
from .topk import encode_at, encode_topk

__all__ = [
    "DecoderLayout",
    "batchtopk",
    "buffers",
    "batchtopk_mask",
    "check_codes",
    "decoder_norms",
    "encode_at",
    "encode_topk",
    "exact_topk_mask",
    "jumprelu",
    "jumprelu_codes",
    "jumprelu_step",
    "mask_to_codes",
    "molt_apply",
    "relu_codes",
    "sparse_decode",
    "sparse_decode_many",
]

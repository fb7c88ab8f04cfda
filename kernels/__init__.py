"""Sparse ops of the CLT trainer: Triton kernels, their torch specifications and the CPU paths.

Each op file (``topk``, ``batchtopk``, ``jumprelu``, ``decode``, ``molt``, ``codes``) reads in
the same order: Triton kernels, host launchers, the autograd Function, the torch specification
(``<op>_torch``) and the documented public op. Which path runs is decided in ``_dispatch``;
CPU performance paths live in ``kernels/cpu/`` behind :func:`cpu_fast_paths` (opt-in).
Imports nothing from ``clt``.
"""

from . import buffers
from ._dispatch import cpu_fast_paths
from .batchtopk import batchtopk, batchtopk_mask, exact_topk_mask
from .codes import mask_to_codes, relu_codes
from .decode import sparse_decode, sparse_decode_many
from .decoder_norms import decoder_norms
from .jumprelu import jumprelu, jumprelu_codes, jumprelu_step
from .layout import DecoderLayout, check_codes
from .molt import molt_apply
from .topk import encode_at, encode_topk

__all__ = [
    "DecoderLayout",
    "batchtopk",
    "buffers",
    "batchtopk_mask",
    "check_codes",
    "cpu_fast_paths",
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

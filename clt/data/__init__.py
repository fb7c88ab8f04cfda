"""Data: frozen language models, token streams and shuffled activation buffers."""

from __future__ import annotations

import torch

from ..config import Config
from .synthetic import PlantedDictionary

# Byte-level ids for the randomly initialised "tiny" LM (d_vocab 260): bytes, then BOS and SEP.
TINY_BOS, TINY_SEP = 256, 257


def _byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def build_source(cfg: Config, device: torch.device):
    """The activation source a config asks for.

    Returns an object with ``d_in``, ``d_out``, ``next_batch(n)``, ``heldout_batches(n)``,
    ``state_dict()`` and ``close()``: a :class:`PlantedDictionary` or an LM-backed
    :class:`~clt.data.activations.ActivationSource`.
    """
    if cfg.data.source == "synthetic":
        return PlantedDictionary(**cfg.data.synthetic.model_dump())
    from .activations import ActivationSource
    from .lm import activation_widths, load_lm
    from .tokens import TokenStream

    lm = cfg.data.lm
    tiny = None
    if lm.name == "tiny":
        tiny = {"n_layers": lm.tiny_n_layers, "d_model": lm.tiny_d_model, "d_mlp": lm.tiny_d_mlp,
                "n_ctx": lm.seq_len, "seed": cfg.train.seed}
    model = load_lm(lm.name, device=device, tiny=tiny)
    layers = cfg.resolved_layers or list(range(model.cfg.n_layers))
    if layers[-1] >= model.cfg.n_layers:
        raise ValueError(f"model.layers {layers} do not exist in {lm.name}, which has "
                         f"{model.cfg.n_layers} layers")
    tokenizer, ids = (model.tokenizer, {}) if tiny is None else (
        _byte_ids, {"bos_id": TINY_BOS, "sep_id": TINY_SEP})
    tokens = TokenStream(tokenizer, lm.dataset, seq_len=lm.seq_len, batch_size=lm.lm_batch_size,
                         heldout_fraction=lm.heldout_fraction, seed=cfg.train.seed, **ids)
    dtype = torch.bfloat16 if lm.buffer_dtype == "bfloat16" else torch.float32
    source = ActivationSource(model, tokens, layers, lm.input_hook, lm.output_hook,
                              buffer_tokens=lm.buffer_tokens, dtype=dtype, device=device,
                              seed=cfg.train.seed)
    source.d_in, source.d_out = activation_widths(model, lm.input_hook, lm.output_hook)
    return source

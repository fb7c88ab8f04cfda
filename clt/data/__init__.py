"""Data: frozen language models, token streams and shuffled activation buffers."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..config import Config
from .cache import ActivationCache

# Byte-level ids for the randomly initialised "tiny" LM (d_vocab 260): bytes, then BOS and SEP.
TINY_BOS, TINY_SEP = 256, 257


class DataError(ValueError):
    """Data that cannot serve a run as configured (a missing dataset, an LM without the asked
    layers, a held-out split smaller than asked); the message names what to change."""


def _byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def tiny_spec(cfg: Config) -> dict | None:
    """Shape and seed of the randomly initialised ``tiny`` LM, or None for a real LM."""
    lm = cfg.data.lm
    if lm.name != "tiny":
        return None
    return {"n_layers": lm.tiny_n_layers, "d_model": lm.tiny_d_model, "d_mlp": lm.tiny_d_mlp,
            "n_ctx": lm.seq_len, "seed": cfg.train.seed}


def frozen_lm(cfg: Config, device: torch.device, chatter=None):
    """``(lm, tokenizer, ids)``: the run's frozen LM as training loads it, its tokenizer and the
    BOS/SEP ids a token stream needs (byte-level for the tiny LM). ``chatter``: where
    transformer-lens's prints go (default stderr, so stdout stays the command's)."""
    # deferred: clt.data.lm imports transformer_lens (seconds); train.py imports this package
    from .lm import load_lm

    tiny = tiny_spec(cfg)
    with contextlib.redirect_stdout(chatter or sys.stderr):
        lm = load_lm(cfg.data.lm.name, device=device, tiny=tiny)
    if tiny is not None:
        return lm, _byte_ids, {"bos_id": TINY_BOS, "sep_id": TINY_SEP}
    return lm, lm.tokenizer, {}


def heldout_stream(cfg: Config, tokenizer, ids: dict, batch_size: int):
    """The run's held-out token sequences, once through (what evaluation and pages read)."""
    # deferred: clt.data.tokens imports datasets (~0.6 s); train.py imports this package
    from .tokens import TokenStream

    lm = cfg.data.lm
    return TokenStream(tokenizer, lm.dataset, seq_len=lm.seq_len, batch_size=batch_size,
                       heldout_fraction=lm.heldout_fraction, seed=cfg.train.seed,
                       split="heldout", loop=False, **ids)


def build_source(cfg: Config, device: torch.device, shard: tuple[int, int] = (0, 1)):
    """The activation stream of the config's source component (``clt.data.sources``);
    ``shard = (i, n)``: the i-th of n processes of a parallel run (the held-out data is
    shared)."""
    return cfg.data.component.build(cfg, device, shard)


def lm_source(cfg: Config, device: torch.device, shard: tuple[int, int] = (0, 1)):
    """An LM-backed :class:`~clt.data.activations.ActivationSource` (``data.lm``): disjoint
    training token streams per process. With ``data.lm.cache_dir`` set, activations come from a
    matching on-disk cache while it lasts, and the LM (the embedded or tiny one) is loaded only
    when activations must be computed.
    """
    # deferred: transformer_lens (clt.data.activations, clt.data.lm) and datasets
    # (clt.data.tokens) take seconds to import; train.py imports this package
    from .activations import ActivationSource
    from .lm import SMOLLM2_NAME, activation_widths, load_lm, load_tokenizer
    from .tokens import TokenStream

    lm = cfg.data.lm
    tiny = tiny_spec(cfg)

    def load_model():
        return load_lm(lm.name, device=device, tiny=tiny)

    # The LM is needed up front unless a cache may stand in for it and the layer count and
    # tokenizer are known without it.
    lazy = lm.cache_dir is not None and lm.shape is not None and (
        tiny is not None or lm.name.lower() == SMOLLM2_NAME)
    model = None if lazy else load_model()
    n_layers = lm.shape.n_layers if model is None else model.cfg.n_layers
    layers = cfg.resolved_layers or list(range(n_layers))
    if layers[-1] >= n_layers:
        raise ValueError(f"model.layers {layers} do not exist in {lm.name}, which has "
                         f"{n_layers} layers")
    if tiny is not None:
        tokenizer, ids = _byte_ids, {"bos_id": TINY_BOS, "sep_id": TINY_SEP}
    else:
        tokenizer, ids = (load_tokenizer(lm.name) if model is None else model.tokenizer), {}
    tokens = TokenStream(tokenizer, lm.dataset, seq_len=lm.seq_len, batch_size=lm.lm_batch_size,
                         heldout_fraction=lm.heldout_fraction, seed=cfg.train.seed, shard=shard,
                         **ids)
    cache = None
    if lm.cache_dir is not None:
        identity = {"model": lm.name, "tiny": tiny, "layers": layers,
                    "input_hook": lm.input_hook, "output_hook": lm.output_hook,
                    "dtype": lm.buffer_dtype, "dataset": lm.dataset, "seq_len": lm.seq_len,
                    "heldout_fraction": lm.heldout_fraction, "seed": cfg.train.seed}
        folder = Path(lm.cache_dir)
        if shard[1] > 1:  # each process caches its own token shard
            identity["shard"] = list(shard)
            folder = folder / f"shard{shard[0]}of{shard[1]}"
        cache = ActivationCache(folder, identity, lm.cache_shard_tokens)
    widths = cache.widths if cache is not None else None
    if widths is None:
        model = load_model() if model is None else model
        widths = activation_widths(model, lm.input_hook, lm.output_hook)
    dtype = torch.bfloat16 if lm.buffer_dtype == "bfloat16" else torch.float32
    source = ActivationSource(load_model if model is None else model, tokens, layers,
                              lm.input_hook, lm.output_hook,
                              buffer_tokens=lm.buffer_tokens, dtype=dtype, device=device,
                              seed=cfg.train.seed, refill_fraction=lm.refill_fraction,
                              reuse_factor=lm.reuse_factor, producer_thread=lm.producer_thread,
                              prefetch_batches=lm.prefetch_batches, cache=cache)
    source.d_in, source.d_out = widths
    return source

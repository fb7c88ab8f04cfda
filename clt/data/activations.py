"""Shuffled per-layer activations of a frozen LM, served as `x [L, n, d_in]`, `y [L, n, d_out]`.

The buffer holds `buffer_tokens` distinct tokens (plus room for one LM batch, so no computed token
is ever dropped). It is refilled from the token stream once `refill_fraction` of it has been
consumed, and each batch is drawn uniformly at random without replacement from everything in it.
Each LM-computed token is served `reuse_factor` times (default once), never twice in one batch.
The BOS position of every packed sequence never enters the buffer: its activations are outliers
that carry no information about the text.

The LM runs in a background producer thread (`producer_thread`), `prefetch_batches` LM batches
ahead, so LM forwards overlap training. The producer only computes the activations of token
batches in stream order and the consumer appends them in that order, so the batches served do not
depend on thread timing: the same seed gives bitwise the same batches with or without the thread.

With an `ActivationCache`, the chunks come from its shards for as long as it has them (the LM is
then never loaded) and newly computed chunks extend it.

Every buffered row remembers which (sequence, position) it came from, so a checkpoint stores only
those ids; `load_state_dict` recomputes the rows (from the cache or with the LM) and the next
batches continue as if the run had never stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from transformer_lens import HookedTransformer

from clt.data.cache import ActivationCache, Chunk
from clt.data.lm import lm_activations
from clt.data.producer import Prefetcher
from clt.data.tokens import TokenStream

ModelOrLoader = HookedTransformer | Callable[[], HookedTransformer]


class ActivationSource:
    """Serve shuffled LM activations for `layers` from a `TokenStream` (its train split).

    `model` is a `HookedTransformer` or a zero-argument callable that loads one, called only when
    activations must be computed (not when a cache has them).
    """

    def __init__(
        self,
        model: ModelOrLoader,
        tokens: TokenStream,
        layers: list[int],
        input_hook: str = "hook_resid_mid",
        output_hook: str = "hook_mlp_out",
        *,
        buffer_tokens: int = 2**14,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        seed: int = 0,
        refill_fraction: float = 0.5,
        reuse_factor: int = 1,
        producer_thread: bool = True,
        prefetch_batches: int = 2,
        cache: ActivationCache | None = None,
    ) -> None:
        if buffer_tokens < 2:
            raise ValueError(f"buffer_tokens must be >= 2, got {buffer_tokens}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"buffer dtype must be a floating dtype, got {dtype}")
        if not 0.0 < refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must lie in (0, 1], got {refill_fraction}")
        if reuse_factor < 1:
            raise ValueError(f"reuse_factor must be >= 1, got {reuse_factor}")
        if prefetch_batches < 1:
            raise ValueError(f"prefetch_batches must be >= 1, got {prefetch_batches}")
        if isinstance(model, HookedTransformer):
            self._model: HookedTransformer | None = model
            self._load_model: Callable[[], HookedTransformer] | None = None
        else:
            self._model, self._load_model = None, model
        if device is None and self._model is None:
            raise ValueError("pass `device` when the model is loaded lazily")
        self.tokens = tokens
        self.layers = list(layers)
        self.input_hook = input_hook
        self.output_hook = output_hook
        self.buffer_tokens = buffer_tokens
        self.dtype = dtype
        self.device = torch.device(device if device is not None else self.model.cfg.device)
        self.seed = seed
        self.refill_fraction = refill_fraction
        self.reuse_factor = reuse_factor
        self.producer_thread = producer_thread
        self.prefetch_batches = prefetch_batches
        self.cache = cache
        self._generator = torch.Generator().manual_seed(seed)
        # Refill below this many rows: once `refill_fraction` of a full buffer is consumed.
        self._refill_below = buffer_tokens - int(buffer_tokens * refill_fraction)
        # Room for `buffer_tokens` plus the overshoot of the LM batch that crosses it.
        self._capacity = buffer_tokens + tokens.batch_size * self._tokens_per_sequence
        self._x: torch.Tensor | None = None  # [L, capacity, d_in]
        self._y: torch.Tensor | None = None  # [L, capacity, d_out]
        self._ids = torch.empty(self._capacity, dtype=torch.int64)  # token id of each row
        self._left = torch.empty(self._capacity, dtype=torch.int64)  # serves left of each row
        self._count = 0
        self._position = tokens.position  # stream sequences appended to the buffer so far
        self._producer: Prefetcher[Chunk] | Generator[Chunk, None, None] | None = None
        self._load_lock = threading.Lock()
        self._heldout: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def model(self) -> HookedTransformer:
        """The frozen LM (loaded on first use when given as a loader)."""
        if self._model is None:
            assert self._load_model is not None
            self._model = self._load_model()
        return self._model

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def _tokens_per_sequence(self) -> int:
        """Tokens a packed sequence contributes: all positions but the BOS."""
        return self.tokens.seq_len - 1

    @property
    def buffered(self) -> int:
        """Distinct tokens currently in the buffer."""
        return self._count

    @property
    def position(self) -> int:
        """Train-stream sequences whose activations entered the buffer (the producer may be
        ahead of it)."""
        return self._position

    def __enter__(self) -> ActivationSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_batch(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [L, n, d_in]`, `y [L, n, d_out]`: n tokens drawn at random from the buffer."""
        if not 0 < n_tokens <= self.buffer_tokens:
            raise ValueError(f"n_tokens must lie in [1, buffer_tokens={self.buffer_tokens}]")
        if self._count < max(n_tokens, self._refill_below):
            self._refill()
        if self._count < n_tokens:
            raise ValueError(f"token stream exhausted: {self._count} tokens left, {n_tokens} asked")
        return self._take(n_tokens)

    def sample_tokens(
        self, n_tokens: int, batch_tokens: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(x, y)` chunks totalling `n_tokens` (e.g. for standardization statistics).

        They come from the training stream like any batch, so they count as served.
        """
        step = batch_tokens or self.buffer_tokens // 2
        remaining = n_tokens
        while remaining > 0:
            chunk = min(step, remaining)
            yield self.next_batch(chunk)
            remaining -= chunk

    def heldout_batches(
        self, n_tokens: int, batch_tokens: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n_tokens` held-out tokens (BOS dropped) as `(x, y)` batches, in order.

        Computed once and cached: every call returns the same tensors.
        """
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        step = batch_tokens or n_tokens
        key = (n_tokens, step)
        if key not in self._heldout:
            x, y = self._heldout_activations(n_tokens)
            self._heldout[key] = [
                (x[:, i : i + step], y[:, i : i + step]) for i in range(0, n_tokens, step)
            ]
        return self._heldout[key]

    def close(self) -> None:
        """Stop and join the producer thread, write any pending cache shard, free the buffers."""
        self._stop_producer()
        if self.cache is not None:
            self.cache.flush()
        self._x = self._y = None
        self._count = 0

    def state_dict(self) -> dict[str, Any]:
        """Stream position, sampler state and the ids of buffered rows (not their activations)."""
        return {
            "tokens": {**self.tokens.state_dict(), "position": self._position},
            "generator": self._generator.get_state(),
            "buffer_ids": self._ids[: self._count].clone(),
            "buffer_left": self._left[: self._count].clone(),
            "layers": self.layers,
            "hooks": (self.input_hook, self.output_hook),
            "reuse_factor": self.reuse_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`: rebuild the buffer by recomputing its rows."""
        if state["layers"] != self.layers or tuple(state["hooks"]) != (
            self.input_hook,
            self.output_hook,
        ):
            raise ValueError(
                f"activation state is for layers {state['layers']} and hooks {state['hooks']}, "
                f"not {self.layers} and {(self.input_hook, self.output_hook)}"
            )
        if state.get("reuse_factor", 1) != self.reuse_factor:
            raise ValueError(
                f"activation state is for reuse_factor {state.get('reuse_factor', 1)}, "
                f"not {self.reuse_factor}"
            )
        ids = state["buffer_ids"].to(torch.int64)
        if len(ids) > self._capacity:
            raise ValueError(f"saved buffer holds {len(ids)} rows, capacity is {self._capacity}")
        self._stop_producer()
        self.tokens.load_state_dict(state["tokens"])
        self._position = self.tokens.position
        self._generator.set_state(state["generator"])
        self._count = 0
        self._recompute(ids)
        left = state.get("buffer_left")
        self._left[: len(ids)] = 1 if left is None else left.to(torch.int64)

    # ---- production --------------------------------------------------------------------------

    def _chunks(self, start: int) -> Generator[Chunk, None, None]:
        """Activations of the train stream's LM batches from sequence `start` on, in order.

        Cached chunks first, then LM-computed ones (which extend the cache). This is the only
        code that runs in the producer thread; nothing else touches `self.tokens` meanwhile.
        """
        position = start
        if self.cache is not None:
            for chunk in self.cache.chunks(position, self.tokens.batch_size):
                yield chunk
                position = chunk.stop
        if self.tokens.position != position:
            self.tokens.load_state_dict({**self.tokens.state_dict(), "position": position})
        for batch in self.tokens:  # [b, T]
            x, y = self._activations(batch)  # [L, b, T-1, d]
            chunk = Chunk(position, x.flatten(1, 2), y.flatten(1, 2), batch)
            if self.cache is not None:
                self.cache.add(chunk)
            yield chunk
            position = chunk.stop

    def _next_chunk(self) -> Chunk | None:
        if self._producer is None:
            chunks = self._chunks(self._position)
            self._producer = (
                Prefetcher(chunks, self.prefetch_batches, self.device)
                if self.producer_thread
                else chunks
            )
        return next(self._producer, None)

    def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close()  # a Prefetcher (joins its thread) or a generator

    def _refill(self) -> None:
        """Append produced chunks until the buffer holds at least `buffer_tokens`."""
        while self._count < self.buffer_tokens:
            chunk = self._next_chunk()
            if chunk is None:
                return
            if chunk.first != self._position:
                raise RuntimeError(
                    f"producer out of order: chunk at {chunk.first}, expected {self._position}"
                )
            ids = self._row_ids(chunk.first, chunk.tokens.shape[0])  # [b * (T-1)]
            self._append(chunk.x, chunk.y, ids)
            self._position = chunk.stop

    def _activations(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM activations of a batch `[b, T]` without the BOS position: `[L, b, T-1, d]`."""
        with self._load_lock:  # the producer and the consumer may both need the model first
            model = self.model
        x, y = lm_activations(model, batch, self.layers, self.input_hook, self.output_hook)
        x = x[:, :, 1:].to(self.device, self.dtype)  # [L, b, T-1, d_in]
        y = y[:, :, 1:].to(self.device, self.dtype)  # [L, b, T-1, d_out]
        return x, y

    def _row_ids(self, first_sequence: int, n_sequences: int) -> torch.Tensor:
        """Token ids `sequence * (T-1) + (position-1)` of a batch's non-BOS tokens."""
        per = self._tokens_per_sequence
        sequences = torch.arange(first_sequence, first_sequence + n_sequences)
        return (sequences[:, None] * per + torch.arange(per)).flatten()  # [b * (T-1)]

    # ---- buffer ------------------------------------------------------------------------------

    def _append(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        """Write rows `x [L, m, d_in]`, `y [L, m, d_out]` after the buffered ones."""
        if self._x is None or self._y is None:
            self._allocate(x.shape[-1], y.shape[-1])
        assert self._x is not None and self._y is not None
        start, stop = self._count, self._count + x.shape[1]
        self._x[:, start:stop] = x.to(self.device, self.dtype)
        self._y[:, start:stop] = y.to(self.device, self.dtype)
        self._ids[start:stop] = ids
        self._left[start:stop] = self.reuse_factor
        self._count = stop

    def _allocate(self, d_in: int, d_out: int) -> None:
        n_layers = len(self.layers)
        shape = (n_layers, self._capacity)
        self._x = torch.empty(*shape, d_in, dtype=self.dtype, device=self.device)
        self._y = torch.empty(*shape, d_out, dtype=self.dtype, device=self.device)

    def _take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Serve n distinct uniformly random rows; rows served `reuse_factor` times leave.

        The rows that were in the last slots and stay move into the holes the leaving rows
        leave below them (swap-remove), so a batch costs O(n) copies, not a buffer permutation.
        """
        assert self._x is not None and self._y is not None
        count = self._count
        pick = torch.randperm(count, generator=self._generator)[:n]  # [n]
        pick_d = pick.to(self.device)
        x = self._x[:, pick_d]  # [L, n, d_in]
        y = self._y[:, pick_d]  # [L, n, d_out]
        if self.reuse_factor == 1:
            gone = pick
        else:
            self._left[pick] -= 1
            gone = pick[self._left[pick] == 0]
        keep = count - len(gone)
        gone_tail = torch.zeros(count - keep, dtype=torch.bool)
        gone_tail[gone[gone >= keep] - keep] = True
        movers = keep + torch.nonzero(~gone_tail).flatten()
        holes = gone[gone < keep]
        holes_d, movers_d = holes.to(self.device), movers.to(self.device)
        self._x[:, holes_d] = self._x[:, movers_d]
        self._y[:, holes_d] = self._y[:, movers_d]
        self._ids[holes] = self._ids[movers]
        self._left[holes] = self._left[movers]
        self._count = keep
        return x, y

    def _recompute(self, ids: torch.Tensor) -> None:
        """Fill the buffer with the rows `ids`, in that order, from the cache or the LM."""
        if len(ids) == 0:
            return
        per = self._tokens_per_sequence
        row_sequence = ids // per  # [n]
        sequences = torch.unique(row_sequence)  # sorted
        cached = self.cache.sequences if self.cache is not None else 0
        self._count = len(ids)
        self._ids[: len(ids)] = ids
        for chunk, x, y in self._rows_of(sequences, cached):
            if self._x is None or self._y is None:
                self._allocate(x.shape[-1], y.shape[-1])
            assert self._x is not None and self._y is not None
            rows = torch.nonzero(torch.isin(row_sequence, chunk)).flatten()
            local = torch.searchsorted(chunk, row_sequence[rows])
            position = ids[rows] % per
            rows_d, local_d, position_d = (t.to(self.device) for t in (rows, local, position))
            self._x[:, rows_d] = x[:, local_d, position_d].to(self.device, self.dtype)
            self._y[:, rows_d] = y[:, local_d, position_d].to(self.device, self.dtype)

    def _rows_of(
        self, sequences: torch.Tensor, cached: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`(sequences chunk, x [L, c, T-1, d_in], y [L, c, T-1, d_out])` for sorted sequences."""
        per = self._tokens_per_sequence
        from_cache = sequences[sequences < cached]
        for s in from_cache.tolist():
            assert self.cache is not None
            chunk = self.cache.read(s, s + 1)
            yield (
                torch.tensor([s]),
                chunk.x.reshape(len(self.layers), 1, per, -1),
                chunk.y.reshape(len(self.layers), 1, per, -1),
            )
        live = sequences[sequences >= cached]
        if len(live) == 0:
            return
        # One replay of the stream for all sequences (each replay re-tokenizes from the start).
        tokens = self.tokens.sequences_at(live.tolist())  # [u, T]
        step = self.tokens.batch_size
        for start in range(0, len(live), step):
            x, y = self._activations(tokens[start : start + step])  # [L, c, T-1, d]
            yield live[start : start + step], x, y

    def _heldout_activations(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n_tokens` non-BOS activations of a fresh held-out stream, in order."""
        if self.cache is not None:
            cached = self.cache.heldout(n_tokens)
            if cached is not None:
                return cached[0].to(self.device), cached[1].to(self.device)
        stream = self.tokens.with_split("heldout", loop=False)
        xs, ys, total = [], [], 0
        for batch in stream:
            x, y = self._activations(batch)  # [L, b, T-1, d]
            xs.append(x.flatten(1, 2))
            ys.append(y.flatten(1, 2))
            total += xs[-1].shape[1]
            if total >= n_tokens:
                break
        if total < n_tokens:
            raise ValueError(f"the held-out split has only {total} tokens, {n_tokens} asked")
        x = torch.cat(xs, dim=1)[:, :n_tokens]  # [L, n, d_in]
        y = torch.cat(ys, dim=1)[:, :n_tokens]  # [L, n, d_out]
        if self.cache is not None:
            self.cache.put_heldout(n_tokens, x, y)
        return x, y

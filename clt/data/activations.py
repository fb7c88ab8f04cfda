"""Shuffled per-layer activations of a frozen LM, served as `x [L, n, d_in]`, `y [L, n, d_out]`.

The buffer holds `buffer_tokens` tokens (plus room for one LM batch, so no computed token is ever
dropped). It is refilled from the token stream when it falls below half full, and each batch is
drawn uniformly at random without replacement from everything in it: each LM-computed token is
served exactly once. The BOS position of every packed sequence never enters the buffer: its
activations are outliers that carry no information about the text.

Every buffered row remembers which (sequence, position) it came from, so a checkpoint stores only
those ids; `load_state_dict` recomputes the rows with the LM and the next batches continue as if
the run had never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformer_lens import HookedTransformer

from clt.data.lm import lm_activations
from clt.data.tokens import TokenStream


class ActivationSource:
    """Serve shuffled LM activations for `layers` from a `TokenStream` (its train split)."""

    def __init__(
        self,
        model: HookedTransformer,
        tokens: TokenStream,
        layers: list[int],
        input_hook: str = "hook_resid_mid",
        output_hook: str = "hook_mlp_out",
        *,
        buffer_tokens: int = 2**14,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> None:
        if buffer_tokens < 2:
            raise ValueError(f"buffer_tokens must be >= 2, got {buffer_tokens}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"buffer dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.tokens = tokens
        self.layers = list(layers)
        self.input_hook = input_hook
        self.output_hook = output_hook
        self.buffer_tokens = buffer_tokens
        self.dtype = dtype
        self.device = torch.device(device if device is not None else model.cfg.device)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        # Room for `buffer_tokens` plus the overshoot of the LM batch that crosses it.
        self._capacity = buffer_tokens + tokens.batch_size * self._tokens_per_sequence
        self._x: torch.Tensor | None = None  # [L, capacity, d_in]
        self._y: torch.Tensor | None = None  # [L, capacity, d_out]
        self._ids = torch.empty(self._capacity, dtype=torch.int64)  # token id of each row
        self._count = 0
        self._heldout: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def _tokens_per_sequence(self) -> int:
        """Tokens a packed sequence contributes: all positions but the BOS."""
        return self.tokens.seq_len - 1

    @property
    def buffered(self) -> int:
        """Tokens currently in the buffer."""
        return self._count

    def next_batch(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [L, n, d_in]`, `y [L, n, d_out]`: n tokens drawn at random from the buffer."""
        if not 0 < n_tokens <= self.buffer_tokens:
            raise ValueError(f"n_tokens must lie in [1, buffer_tokens={self.buffer_tokens}]")
        if self._count < max(n_tokens, self.buffer_tokens // 2):
            self._refill()
        if self._count < n_tokens:
            raise ValueError(f"token stream exhausted: {self._count} tokens left, {n_tokens} asked")
        return self._take(n_tokens)

    def sample_tokens(
        self, n_tokens: int, batch_tokens: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(x, y)` chunks totalling `n_tokens` (e.g. for standardization statistics).

        They come from the training stream like any batch, so they are not served again.
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
        """Release the buffers (there is no producer thread to stop)."""
        self._x = self._y = None
        self._count = 0

    def state_dict(self) -> dict[str, Any]:
        """Stream position, sampler state and the ids of buffered rows (not their activations)."""
        return {
            "tokens": self.tokens.state_dict(),
            "generator": self._generator.get_state(),
            "buffer_ids": self._ids[: self._count].clone(),
            "layers": self.layers,
            "hooks": (self.input_hook, self.output_hook),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`: rebuild the buffer by recomputing its rows with the LM."""
        if state["layers"] != self.layers or tuple(state["hooks"]) != (
            self.input_hook,
            self.output_hook,
        ):
            raise ValueError(
                f"activation state is for layers {state['layers']} and hooks {state['hooks']}, "
                f"not {self.layers} and {(self.input_hook, self.output_hook)}"
            )
        ids = state["buffer_ids"].to(torch.int64)
        if len(ids) > self._capacity:
            raise ValueError(f"saved buffer holds {len(ids)} rows, capacity is {self._capacity}")
        self.tokens.load_state_dict(state["tokens"])
        self._generator.set_state(state["generator"])
        self._count = 0
        self._recompute(ids)

    def _refill(self) -> None:
        """Run the LM on stream batches until the buffer holds at least `buffer_tokens`."""
        while self._count < self.buffer_tokens:
            first_sequence = self.tokens.position
            try:
                batch = next(self.tokens)  # [b, T]
            except StopIteration:
                return
            x, y = self._activations(batch)  # [L, b, T-1, d]
            ids = self._row_ids(first_sequence, batch.shape[0])  # [b * (T-1)]
            self._append(x.flatten(1, 2), y.flatten(1, 2), ids)

    def _activations(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM activations of a batch `[b, T]` without the BOS position: `[L, b, T-1, d]`."""
        x, y = lm_activations(self.model, batch, self.layers, self.input_hook, self.output_hook)
        x = x[:, :, 1:].to(self.device, self.dtype)  # [L, b, T-1, d_in]
        y = y[:, :, 1:].to(self.device, self.dtype)  # [L, b, T-1, d_out]
        return x, y

    def _row_ids(self, first_sequence: int, n_sequences: int) -> torch.Tensor:
        """Token ids `sequence * (T-1) + (position-1)` of a batch's non-BOS tokens."""
        per = self._tokens_per_sequence
        sequences = torch.arange(first_sequence, first_sequence + n_sequences)
        return (sequences[:, None] * per + torch.arange(per)).flatten()  # [b * (T-1)]

    def _append(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        """Write rows `x [L, m, d_in]`, `y [L, m, d_out]` after the buffered ones."""
        if self._x is None or self._y is None:
            self._allocate(x.shape[-1], y.shape[-1])
        assert self._x is not None and self._y is not None
        start, stop = self._count, self._count + x.shape[1]
        self._x[:, start:stop] = x
        self._y[:, start:stop] = y
        self._ids[start:stop] = ids
        self._count = stop

    def _allocate(self, d_in: int, d_out: int) -> None:
        n_layers = len(self.layers)
        shape = (n_layers, self._capacity)
        self._x = torch.empty(*shape, d_in, dtype=self.dtype, device=self.device)
        self._y = torch.empty(*shape, d_out, dtype=self.dtype, device=self.device)

    def _take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove n uniformly random rows and return them; the buffer stays compact.

        The rows that were in the last n slots and not drawn move into the holes the drawn rows
        leave below them (swap-remove), so a batch costs O(n) copies, not a buffer permutation.
        """
        assert self._x is not None and self._y is not None
        count, keep = self._count, self._count - n
        pick = torch.randperm(count, generator=self._generator)[:n]  # [n]
        picked_tail = torch.zeros(n, dtype=torch.bool)
        picked_tail[pick[pick >= keep] - keep] = True
        movers = keep + torch.nonzero(~picked_tail).flatten()
        holes = pick[pick < keep]
        pick_d, holes_d, movers_d = (t.to(self.device) for t in (pick, holes, movers))
        x = self._x[:, pick_d]  # [L, n, d_in]
        y = self._y[:, pick_d]  # [L, n, d_out]
        self._x[:, holes_d] = self._x[:, movers_d]
        self._y[:, holes_d] = self._y[:, movers_d]
        self._ids[holes] = self._ids[movers]
        self._count = keep
        return x, y

    def _recompute(self, ids: torch.Tensor) -> None:
        """Fill the buffer with the rows `ids`, in that order, by re-running their sequences."""
        if len(ids) == 0:
            return
        per = self._tokens_per_sequence
        row_sequence = ids // per  # [n]
        sequences = torch.unique(row_sequence)  # sorted
        # One replay of the stream for all sequences (each replay re-tokenizes from the start).
        tokens = self.tokens.sequences_at(sequences.tolist())  # [u, T]
        self._count = len(ids)
        self._ids[: len(ids)] = ids
        step = self.tokens.batch_size
        for start in range(0, len(sequences), step):
            x, y = self._activations(tokens[start : start + step])  # [L, c, T-1, d]
            if self._x is None or self._y is None:
                self._allocate(x.shape[-1], y.shape[-1])
            assert self._x is not None and self._y is not None
            chunk = sequences[start : start + step]
            rows = torch.nonzero(torch.isin(row_sequence, chunk)).flatten()
            local = torch.searchsorted(chunk, row_sequence[rows])
            position = ids[rows] % per
            rows_d, local_d, position_d = (t.to(self.device) for t in (rows, local, position))
            self._x[:, rows_d] = x[:, local_d, position_d]
            self._y[:, rows_d] = y[:, local_d, position_d]

    def _heldout_activations(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n_tokens` non-BOS activations of a fresh held-out stream, in order."""
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
        return x, y

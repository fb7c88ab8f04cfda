"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

The LM forward of the next token batches overlaps the consumer's work (torch releases the GIL
inside its ops). Items leave in the order the iterator yields them, whatever the thread timing,
so a deterministic iterator stays deterministic. An exception in the iterator is re-raised by the
consumer's `next()` (same exception object, so its traceback still shows the producer's frames).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

_POLL_S = 0.05  # how often a blocked producer checks whether it was asked to stop


class _End:
    """Marks the end of the iterator."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate `source` in a daemon thread, at most `depth` items ahead.

    `close()` stops the thread and joins it (it is safe to call at any time, twice, or after the
    source ended); a consumer that stops early never deadlocks the producer, which waits on the
    full queue with a timeout and checks a stop flag. On a CUDA `device` the producer works on its
    own stream and finishes each item's kernels before handing it over.
    """

    def __init__(self, source: Iterator[T], depth: int = 2, device: Any = None) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        device = torch.device(device) if device is not None else None
        self._cuda = device is not None and device.type == "cuda"
        self._thread = threading.Thread(
            target=self._run, args=(device,), name="clt-activation-producer", daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the activation producer thread died silently") from None
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        if self._cuda:
            _record_stream(item, torch.cuda.current_stream())
        return item

    def close(self) -> None:
        """Stop the producer and wait for it; pending items are dropped."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=_POLL_S)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _run(self, device: torch.device | None) -> None:
        stream = torch.cuda.Stream(device=device) if self._cuda else None
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for item in self._source:
                    if stream is not None:
                        stream.synchronize()
                    if not self._put(item):
                        return
            self._put(_End())
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, re-raised there)
            self._put(_Failure(error))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()  # a generator runs its `finally` blocks in this thread

    def _put(self, item: Any) -> bool:
        """Queue `item` unless asked to stop first; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False


def _record_stream(item: Any, stream: Any) -> None:
    """Tell the CUDA caching allocator that the consumer's stream uses the item's tensors."""
    values = item if isinstance(item, tuple) else (item,)
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(stream)

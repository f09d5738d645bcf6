"""Coalescing the patches of concurrent requests into shared network batches.

Every request thread prepares its own patches (decoding, guidance maps) and
post-processes its own masks; only the forward pass is shared.  One
inference thread owns the model: it takes the first waiting chunk of
patches, then keeps collecting chunks from other requests until the batch
holds ``max_batch`` patches or ``max_wait_s`` has passed since the first,
runs the network once and hands every caller its slice.  So a GPU sees full
batches under load, and a lone client waits at most ``max_wait_s`` extra.

A caller whose RPC was cancelled (client gone, deadline expired, server
stopping) sets its cancel event: its chunk is dropped before the forward pass
if it has not run yet, and the caller stops waiting at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("bridge.service.batching")


class Cancelled(Exception):
    """The caller's RPC is over; its work was dropped."""


class ShuttingDown(Exception):
    """The batcher was stopped before this chunk ran."""


@dataclass
class _Chunk:
    inputs: np.ndarray
    cancel: threading.Event | None
    done: threading.Event = field(default_factory=threading.Event)
    output: np.ndarray | None = None
    error: BaseException | None = None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class BatchStats:
    batches: int = 0
    patches: int = 0
    chunks: int = 0
    largest_batch: int = 0
    dropped_chunks: int = 0
    queued_chunks: int = 0


class Batcher:
    """``run(inputs)`` from any thread; ``predict`` runs on one thread only.

    ``predict`` maps (B, ...) inputs to (B, ...) outputs, row by row.
    A chunk larger than ``max_batch`` runs alone.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        on_start: Callable[[], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: queue.Queue[_Chunk | None] = queue.Queue()
        self._carry: _Chunk | None = None
        self._lock = threading.Lock()
        self._stats = BatchStats()
        self._stopped = False
        self._on_start = on_start
        self._on_batch = on_batch  # e.g. the batch-size histogram of /metrics
        self._thread = threading.Thread(target=self._loop, name="nuclick-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers

    def run(self, inputs: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray:
        """Outputs for ``inputs``, computed in a shared batch; raises
        :class:`Cancelled` as soon as ``cancel`` is set."""
        if len(inputs) == 0:
            return self.predict(inputs)
        chunk = _Chunk(inputs, cancel)
        if chunk.cancelled():
            raise Cancelled("the call was cancelled")
        with self._lock:
            if self._stopped:
                raise ShuttingDown("the server is shutting down")
            self._stats.queued_chunks += 1
        self._queue.put(chunk)
        while not chunk.done.wait(0.02):
            if chunk.cancelled():
                raise Cancelled("the call was cancelled")
        if chunk.error is not None:
            raise chunk.error
        assert chunk.output is not None
        return chunk.output

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats.__dict__)

    @property
    def running(self) -> bool:
        """Whether the inference thread is alive (False once :meth:`stop` has finished)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then stop the inference thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------- the inference thread

    def _next(self, timeout: float | None) -> _Chunk | None:
        if self._carry is not None:
            chunk, self._carry = self._carry, None
            return chunk
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _collect(self) -> tuple[list[_Chunk], bool]:
        """One batch worth of chunks, and whether the stop sentinel was seen."""
        first = self._next(None)
        if first is None:
            return [], True
        chunks, n = [first], len(first.inputs)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._next(max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return chunks, True
            if n + len(nxt.inputs) > self.max_batch:
                self._carry = nxt
                break
            chunks.append(nxt)
            n += len(nxt.inputs)
        return chunks, False

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()  # e.g. torch's thread settings, which are per thread
        stop = False
        while not stop or self._carry is not None:
            if stop:
                chunks = [self._carry]
                self._carry = None
            else:
                chunks, stop = self._collect()
            self._run_batch([c for c in chunks if c is not None])
        # Anything still queued after the sentinel: nobody will run it.
        while True:
            try:
                chunk = self._queue.get_nowait()
            except queue.Empty:
                break
            if chunk is not None:
                chunk.error = ShuttingDown("the server is shutting down")
                chunk.done.set()

    def _run_batch(self, chunks: list[_Chunk]) -> None:
        live = []
        for c in chunks:
            if c.cancelled():
                c.error = Cancelled("the call was cancelled")
                c.done.set()
            else:
                live.append(c)
        with self._lock:
            self._stats.dropped_chunks += len(chunks) - len(live)
            self._stats.queued_chunks -= len(chunks)
        if not live:
            return
        inputs = live[0].inputs if len(live) == 1 else np.concatenate([c.inputs for c in live])
        try:
            outputs = self.predict(inputs)
        except Exception as exc:  # an error in the model fails this batch, not the server
            log.exception("inference failed for a batch of %d patches", len(inputs))
            for c in live:
                c.error = exc
                c.done.set()
            return
        with self._lock:
            self._stats.batches += 1
            self._stats.patches += len(inputs)
            self._stats.chunks += len(live)
            self._stats.largest_batch = max(self._stats.largest_batch, len(inputs))
        if self._on_batch is not None:
            self._on_batch(len(inputs))
        start = 0
        for c in live:
            c.output = outputs[start : start + len(c.inputs)]
            start += len(c.inputs)
            c.done.set()

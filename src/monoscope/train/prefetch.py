"""Batches read and copied to the GPU on a background thread while the current step runs.

On a GPU the trainer's step is a few milliseconds; reading store rows (file reads, checksums, the
window shuffle's gather) and a pageable host-to-device copy cost as much again, and done inline they
serialise with the step. `DevicePrefetch` wraps any `BatchSource`: a thread takes the next `depth`
batches from it, pins each batch's rows and copies them on a side CUDA stream; `__next__` hands them
out in the source's order, making the training stream wait for the copy (an event, not a host sync).

Exact resume is kept: each queued batch carries the source's cursor right after it, and
`state_dict()` is the cursor after the last batch handed out, not after the read-ahead. A source
error (a corrupt shard) or the source's end reaches the caller at the batch where it happened.
The source must not be touched by anyone else while the thread runs; `load_state_dict` and `close`
stop the thread first.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from monoscope.store.batches import Batch

DEPTH = 4
"""Batches read ahead: enough to hide a shard-window refill behind a few steps, a few MB of GPU memory."""


class DevicePrefetch:
    """A `BatchSource` whose batches arrive on `device` already (module docstring)."""

    def __init__(self, source: Any, device: torch.device | str, depth: int = DEPTH) -> None:
        self.source = source
        self.device = torch.device(device)
        self.depth = max(1, depth)
        self._state = source.state_dict()  # the cursor after the last batch handed out
        self._queue: queue.Queue[tuple[str, Any, Any, Any]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ended = False

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._fill, name="monoscope-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self.source)
                except StopIteration:
                    self._put(("end", None, None, None))
                    return
                state = self.source.state_dict()
                event = None
                acts = batch.acts
                if stream is not None:
                    with torch.cuda.stream(stream):
                        acts = acts.pin_memory().to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    acts = acts.to(self.device)
                self._put(("batch", Batch(acts, batch.rows), state, event))
        except BaseException as exc:  # handed to the consumer at this position in the stream
            self._put(("error", exc, None, None))

    def _put(self, item: tuple[str, Any, Any, Any]) -> None:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Batch:
        if self._ended:
            raise StopIteration
        if self._thread is None:
            self._start()
        assert self._queue is not None
        kind, payload, state, event = self._queue.get()
        if kind == "end":
            self._ended = True
            self.close()
            raise StopIteration
        if kind == "error":
            self.close()
            raise payload
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            payload.acts.record_stream(current)  # the side stream's allocation is now used here
        self._state = state
        return payload

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()
        self._ended = False

    def close(self) -> None:
        """Stop the thread and drop the read-ahead (the source's cursor is then past it: use
        `load_state_dict(state_dict())` before reading the source directly)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None

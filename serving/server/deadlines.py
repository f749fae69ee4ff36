"""Deadlines and abandoned requests: the work of a request whose client has gone stops.

A request runs under a `Call`: its deadline (the gRPC deadline, or
`--rest_api_timeout_in_ms`) and whether its client is still there (gRPC's
`context.is_active`). The `Watchdog` cancels a running signature —
TensorFlow's CancellationManager stops the graph, its decoding loop included
— once every request it serves is abandoned, so a client that leaves does
not keep a core busy; a batch runs on while any of its requests still waits.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import tensorflow as tf

from serving.contract import ServingError


class Call:
    """One request's caller: its deadline and whether its client is still waiting.

    Args:
        timeout: seconds from now until the deadline (None: no deadline).
        is_active: returns False once the client has gone (gRPC's `context.is_active`).
    """

    def __init__(self, timeout: float | None = None, is_active: Callable[[], bool] | None = None):
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._is_active = is_active
        self.gone = threading.Event()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def abandoned(self) -> bool:
        return self.gone.is_set() or self.expired() or (self._is_active is not None and not self._is_active())

    def check(self) -> None:
        """Raises the ServingError of an abandoned call (DEADLINE_EXCEEDED or CANCELLED)."""
        if self.expired():
            raise ServingError("DEADLINE_EXCEEDED", "Deadline Exceeded")
        if self.abandoned():
            raise ServingError("CANCELLED", "the client cancelled the request")


def _thread_cancellation():
    """Makes TensorFlow's cancellation context per thread; returns a setter, or None if unavailable.

    `tf.function` calls read the CancellationManager to run under from one
    process-wide variable (`tensorflow.python.eager.cancellation.context()`,
    set by `CancellationManager.get_cancelable_function`), so two requests
    starting at once in two threads could swap managers — cancelling one
    would stop the other. The server's threads set theirs here instead; a
    thread that set none sees TensorFlow's own variable as before.
    """
    try:
        from tensorflow.python.eager import cancellation
    except ImportError:
        return None
    if getattr(cancellation, "_lmstack_local", None) is None:
        original = cancellation.context
        local = threading.local()
        cancellation.context = lambda: getattr(local, "manager", None) or original()
        cancellation._lmstack_local = local
    return cancellation


class Watchdog:
    """Cancels running signatures whose requests are all abandoned (checked every `interval` seconds)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._running: dict[int, tuple[Any, tuple[Call, ...]]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._cancellation = _thread_cancellation()
        threading.Thread(target=self._loop, name="watchdog", daemon=True).start()

    def cancellable(self, fn, calls: Sequence[Call]):
        """`fn` (a concrete function) wrapped to stop once every call in `calls` is abandoned."""
        if self._cancellation is None:
            return fn
        calls = tuple(calls)

        def run(**inputs):
            manager = self._cancellation.CancellationManager()
            local = self._cancellation._lmstack_local
            with self._lock:
                key, self._next = self._next, self._next + 1
                self._running[key] = (manager, calls)
            local.manager = manager
            try:
                return fn(**inputs)
            except (tf.errors.CancelledError, tf.errors.AbortedError):
                for call in calls:
                    call.check()
                raise
            finally:
                local.manager = None
                with self._lock:
                    del self._running[key]
        return run

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                running = list(self._running.values())
            for manager, calls in running:
                if calls and all(call.abandoned() for call in calls) and not manager.is_cancelled:
                    manager.start_cancel()

"""A real-time SimPy environment whose instances step their real backends at the same time, in threads.

With one real instance the engine calls ``backend.step`` in SimPy's thread: the step spends the wall time,
then a timeout of its measured length catches the clock up. Several instances stepped that way would take
turns on the machine, which is not what N independent engines do. Here each engine hands its step to its
own worker thread and waits on an event; llama.cpp's ``llama_decode`` runs without the GIL (ctypes drops
it), so the instances' steps overlap in wall time as separate engines' would. The worker reports back
through a queue; SimPy's thread, which sleeps on that queue rather than in ``time.sleep``, schedules the
step's end at its start plus the step's measured seconds (or now, if SimPy's clock already passed that),
so the timeline is the one-instance driver's: a step ends at start + elapsed_s.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

import simpy
import simpy.rt
from simpy.core import EmptySchedule, Infinity


class ThreadedRealtimeEnvironment(simpy.rt.RealtimeEnvironment):
    """RealtimeEnvironment(strict=False) plus run_in_thread: a backend step off SimPy's thread."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__(factor=factor, strict=False)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: dict[Any, _Worker] = {}
        self._pending = 0
        self.num_late = 0  # steps whose end SimPy's clock had already passed when it heard of it
        self.max_late_s = 0.0  # by how much, at most

    def run_in_thread(self, key: Any, fn: Callable[..., Any], *args: Any) -> simpy.Event:
        """An event that succeeds with fn(*args), run on key's own worker thread (one call at a time per key);
        it is scheduled at its start plus the result's elapsed_s. An exception in fn fails the event."""
        event = self.event()
        worker = self._workers.get(key)
        if worker is None:
            worker = self._workers[key] = _Worker(self._done, f"tokenstep-instance-{key}")
        self._pending += 1
        worker.submit(event, self.now, fn, args)
        return event

    def step(self) -> None:
        """Process the next event once its wall time has come, taking in finished steps meanwhile."""
        while True:
            evt_time = self.peek()
            if evt_time is Infinity and self._pending == 0:
                raise EmptySchedule
            wait = None if evt_time is Infinity else self.real_start + (evt_time - self.env_start) * self.factor \
                - monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                item = self._done.get(timeout=wait) if wait is not None else self._done.get()
            except queue.Empty:
                break
            self._finish(*item)
        simpy.Environment.step(self)

    def _finish(self, event: simpy.Event, start: float, ok: bool, value: Any) -> None:
        self._pending -= 1
        end = start + value.elapsed_s if ok else self.now
        if end < self.now:
            self.num_late += 1
            self.max_late_s = max(self.max_late_s, self.now - end)
            end = self.now
        event._ok, event._value = ok, value  # what Event.succeed / fail set, scheduled at the step's end
        self.schedule(event, delay=end - self.now)

    def close(self) -> None:
        """Stop the worker threads (after the run: none has a step in flight)."""
        for w in self._workers.values():
            w.stop()
        self._workers.clear()


class _Worker:
    """One thread that runs one instance's steps in order."""

    def __init__(self, done: queue.SimpleQueue, name: str) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._done = done
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, event: simpy.Event, start: float, fn: Callable[..., Any], args: tuple) -> None:
        """Queue one call."""
        self._inbox.put((event, start, fn, args))

    def _loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            event, start, fn, args = item
            try:
                self._done.put((event, start, True, fn(*args)))
            except BaseException as exc:  # handed to SimPy's thread, which raises it in the waiting process
                self._done.put((event, start, False, exc))

    def stop(self) -> None:
        """End the thread once its queue is empty."""
        self._inbox.put(None)
        self._thread.join()

"""Busy neighbours: other real instances serving a steady stream while one instance is timed.

A profile for N instances sharing a machine is calibrated on one context while the other N - 1 contexts of
the same model step on their own threads, as their engines would in a multi-instance run: the timed steps
then pay for the cores' shared caches and memory bandwidth. Each neighbour is a plain scheduler loop over
a closed stream of requests (a new one whenever fewer than `running` are unfinished), with prompts and
outputs of the probe's shape (16-240 and 4-40 tokens), so it mixes decodes and prompt chunks.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from scheduler.loop import release_kv, run_step

VOCAB_HI = 20000  # token ids drawn below this, as the calibration grid's


class Neighbours:
    """Context manager: backends serve a steady load on their own threads until the block ends."""

    def __init__(self, backends: list[Any], config: SchedulerConfig, seed: int = 0, running: int = 4,
                 prompt_tokens: tuple[int, int] = (16, 240), output_tokens: tuple[int, int] = (4, 40)) -> None:
        self.backends, self.config, self.seed, self.running = list(backends), config, seed, running
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.num_steps = [0] * len(self.backends)

    def __enter__(self) -> Neighbours:
        self._stop.clear()
        for i, b in enumerate(self.backends):
            t = threading.Thread(target=self._serve, args=(i, b), name=f"tokenstep-neighbour-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()
        if self._errors and exc[0] is None:
            raise RuntimeError(f"a neighbour instance failed: {self._errors[0]}") from self._errors[0]

    def _serve(self, index: int, backend: Any) -> None:
        try:
            rng = np.random.default_rng([self.seed, index])
            sched = Scheduler(self.config, "continuous")
            backend.clear_kv()
            n, now = 0, 0.0
            while not self._stop.is_set():
                while sched.num_unfinished < self.running:
                    prompt = rng.integers(10, VOCAB_HI, size=int(rng.integers(*self.prompt_tokens, endpoint=True)))
                    sp = SamplingParams(max_tokens=int(rng.integers(*self.output_tokens, endpoint=True)),
                                        ignore_eos=True)
                    sched.add_request(Request(f"n{index}-{n}", tuple(prompt.tolist()), sp), now)
                    n += 1
                now = run_step(sched, backend, now).now_s
                self.num_steps[index] += 1
            release_kv(sched, backend, now)
            backend.clear_kv()
        except BaseException as exc:  # raised in the caller's thread on exit
            self._errors.append(exc)

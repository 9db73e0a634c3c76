"""
The cyclic garbage collector's passes in a running gateway.

A full pass scans every tracked object not frozen, and stalls the reactor,
and so every device's acknowledgement, while it runs: at 100,000 devices
the day's books (message ids, each device's day) took 40-60 ms a pass.
The intake makes no cyclic garbage of its own, so what survives a middle
pass, and would otherwise wait in the old generation for the next full
one, is frozen (C{gc.freeze}) instead: full passes find next to nothing to
scan.  What is frozen is still freed by its reference count; only cyclic
garbage made of frozen objects waits, for L{Collector.sweep}, which the
gateway runs as each round closes and it forgets the old days: once a day,
when the fleet has reported.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

from twisted.logger import Logger

#: Passes of the collector's middle generation between two full passes
#: (CPython's default is 10; a middle pass comes every 10 young ones).
FULL_COLLECTION_EVERY = 100


class Collector:
    """
    The gateway's policy for the cyclic collector, which is the process's:
    L{settle} once started, L{sweep} as old days are forgotten, L{release}
    to give the collector back as it was.

    @param timer: seconds, for how long a sweep took (in the log only).
    """

    log = Logger()

    def __init__(self, timer: Callable[[], float] = time.perf_counter):
        self._timer = timer
        self._threshold: tuple[int, int, int] | None = None

    def settle(self) -> None:
        """
        What exists now (the modules, the state recovered from the spool)
        lives as long as the process: frozen; full passes come every
        L{FULL_COLLECTION_EVERY} middle ones, and what survives a middle or
        full pass is frozen.
        """
        if self._threshold is not None:
            return
        gc.collect()
        gc.freeze()
        self._threshold = gc.get_threshold()
        young, middle, _ = self._threshold
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
        gc.callbacks.append(self._after_pass)

    def _after_pass(self, phase: str, info: dict) -> None:
        # A middle or full pass leaves the generations younger than its own
        # empty, so this freezes only what survived it (and, after a middle
        # pass, nothing else: the old generation was frozen before).
        if phase == "stop" and info.get("generation", 0) >= 1:
            gc.freeze()

    def sweep(self) -> None:
        """
        One full pass over everything, the frozen included, then freeze what
        is left: cyclic garbage made of frozen objects goes.
        """
        if self._threshold is None:
            return
        started = self._timer()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.log.info(
            "collector: a full pass after forgetting old days took {ms:.1f} ms, {collected} objects collected",
            ms=(self._timer() - started) * 1000, collected=collected,
        )

    def release(self) -> None:
        """
        Give the collector back: no freezing after passes, nothing frozen,
        the thresholds as they were before L{settle}.
        """
        if self._threshold is None:
            return
        if self._after_pass in gc.callbacks:
            gc.callbacks.remove(self._after_pass)
        gc.unfreeze()
        gc.set_threshold(*self._threshold)
        self._threshold = None

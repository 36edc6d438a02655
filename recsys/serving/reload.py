"""Hot model reload: the serving reference and the poller that replaces it.

A request reads `holder.current` once and keeps that object until it answers, so a swap never
changes the model under a request in flight: the old Ranker finishes its requests and is freed
when the last one drops its reference. A new version is loaded completely (weights, stores,
one warm-up call) before the reference moves; a load that fails leaves the old model serving.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from recsys.serving.scorer import Scorer

log = logging.getLogger(__name__)


class ModelHolder:
    """The scorer serving right now. Reading `current` is one attribute load (atomic)."""

    def __init__(self, scorer: Scorer):
        self._current = scorer
        self._swap_lock = threading.Lock()

    @property
    def current(self) -> Scorer:
        return self._current

    def swap(self, scorer: Scorer) -> Scorer:
        """Serve `scorer` from now on; returns the one it replaces."""
        with self._swap_lock:
            old, self._current = self._current, scorer
        return old


class AliasPoller:
    """Polls a registry alias in a daemon thread and swaps in the version it points to.

    Args:
        holder: the reference to update.
        probe: returns the version the alias points to now (cheap: one registry query).
        load: loads and warms a complete scorer for the alias (called only on a change).
        interval_s: seconds between probes.
        on_swap: called with the new scorer after a swap (metrics).
        on_failure: called with the exception when a probe or load fails.
    """

    def __init__(
        self,
        holder: ModelHolder,
        probe: Callable[[], str],
        load: Callable[[], Scorer],
        interval_s: float = 30.0,
        on_swap: Callable[[Scorer], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.holder = holder
        self.probe = probe
        self.load = load
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """One probe; loads and swaps when the alias moved. Returns True when it swapped."""
        serving = self.holder.current.version
        try:
            target = self.probe()
            if target == serving:
                return False
            log.info("registry alias moved from version %s to %s: loading it", serving, target)
            scorer = self.load()
        except Exception as exc:  # a broken new version must never take the service down
            log.exception("model reload failed; version %s keeps serving", serving)
            if self.on_failure is not None:
                self.on_failure(exc)
            return False
        if scorer.version == serving:
            return False
        self.holder.swap(scorer)
        log.info("now serving model version %s (was %s)", scorer.version, serving)
        if self.on_swap is not None:
            self.on_swap(scorer)
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="muse-model-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_once()

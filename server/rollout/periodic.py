"""The periodic look the rollout and SLO controllers share: `tick()` every interval on the event loop, until `stop()`."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class Periodic:
    """A base for a controller that looks at its state every `interval_s`: `start_ticking` starts the loop on the running
    event loop, `stop` ends it (awaiting the look in progress, if any, to be cancelled). A look that raises is logged,
    and the loop goes on: one bad look must not stop the controller."""

    default_interval_s: float | None = None  # the interval of `start_ticking()` called without one
    _task: asyncio.Task | None = None

    async def tick(self) -> None:
        raise NotImplementedError

    def start_ticking(self, interval_s: float | None = None) -> None:
        interval = self.default_interval_s if interval_s is None else interval_s
        if interval is None or interval <= 0:
            raise ValueError(f"{type(self).__name__}.start_ticking needs an interval > 0 seconds, got {interval}")
        self._task = asyncio.get_running_loop().create_task(self._run(interval), name=f"{type(self).__name__} ticks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:  # a bad look must not end the loop
                log.exception("%s tick failed", type(self).__name__)

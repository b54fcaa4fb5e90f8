"""Read-only replicas: notice what the writer changed in a shared repository and load it live.

Polls each model's manifest (inode, mtime, size) every `interval` seconds; a new model is loaded,
a changed one refreshed (new variants load, routing swaps, deleted variants drain and unload),
a removed one unloaded. Manifests are replaced by rename, so a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import logging
import os

from slimserve.server.inference.dataplane import DataPlane
from slimserve.server.store.repository import Repository

log = logging.getLogger(__name__)


class RepositoryWatcher:
    def __init__(self, repository: Repository, dataplane: DataPlane, interval: float) -> None:
        self.repository = repository
        self.dataplane = dataplane
        self.interval = interval
        self.seen: dict[str, tuple[int, int, int]] = {}
        self._task: asyncio.Task | None = None

    def _stamps(self) -> dict[str, tuple[int, int, int]]:
        stamps = {}
        models = self.repository.models_dir
        if not models.is_dir():  # the writer has not started yet
            return stamps
        for entry in os.scandir(models):
            try:
                st = os.stat(os.path.join(entry.path, "manifest.json"))
            except FileNotFoundError:
                continue
            stamps[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return stamps

    async def scan(self) -> None:
        """One pass: load, refresh or unload what changed since the last."""
        stamps = await self.dataplane.run_blocking(self._stamps)
        for name, stamp in stamps.items():
            if self.seen.get(name) == stamp:
                continue
            try:
                if self.dataplane.is_loaded(name):
                    await self.dataplane.refresh(name)
                else:
                    await self.dataplane.load_model(name)
                self.seen[name] = stamp
            except Exception as e:  # half-written by a writer that crashed, or a broken variant: try again next pass
                log.warning("repository watch: model '%s' did not load: %s", name, e)
        for name in [n for n in self.seen if n not in stamps]:
            del self.seen[name]
            if self.dataplane.is_loaded(name):
                await self.dataplane.unload_model(name)  # its statistics, feedback and series go with it
                log.info("repository watch: model '%s' was deleted by the writer; unloaded", name)

    async def run(self) -> None:
        self.seen = await self.dataplane.run_blocking(self._stamps)  # what start() loaded
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scan()
            except Exception:  # never let the watcher die: the replica would go stale silently
                log.exception("repository watch failed; retrying in %.1f s", self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="repository watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

"""Shadow mirroring: a copy of a routed request runs on each shadow variant after the primary answered; only compared.

A shadow never shows in the primary's answer: it runs in the background, skips requests when its
queue is full or too many mirrored calls are pending, and its failures are only counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from slimserve.server.errors import ResourceExhausted, Unavailable
from slimserve.server.inference.loaded import ServedVariant
from slimserve.server.telemetry.statistics import FeedbackStore

log = logging.getLogger(__name__)


def top1(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Predicted class per sample from a classifier's first output ([N, classes] floats); None otherwise."""
    array = next(iter(outputs.values()), None)
    if array is None or array.ndim < 2 or array.dtype.kind != "f" or array.shape[0] < 1:
        return None
    return array.reshape(array.shape[0], -1).argmax(axis=1)


class ShadowMirror:
    """Starts mirrored calls, at most MAX_SHADOW_TASKS pending per server: beyond it, shadows skip requests rather than pile up."""

    MAX_SHADOW_TASKS = 256

    def __init__(self, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task]) -> None:
        self.spawn = spawn
        self.pending = 0

    def mirror(
        self,
        model: str,
        request_id: str,
        shadows: tuple[ServedVariant, ...],
        feedback: FeedbackStore,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        primary: np.ndarray | None,
    ) -> None:
        """Sends a copy of an answered request to each shadow; `primary` is the primary's top-1 (None: not a classifier)."""
        for served in shadows:
            if self.pending >= self.MAX_SHADOW_TASKS:
                log.debug("shadow '%s' of '%s' skipped a request: %d mirrored calls pending", served.name, model, self.pending)
                continue
            self.pending += 1
            self.spawn(self._run(model, request_id, served, feedback, inputs, outputs, primary))

    async def _run(
        self,
        model: str,
        request_id: str,
        served: ServedVariant,
        feedback: FeedbackStore,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        primary: np.ndarray | None,
    ) -> None:
        recorder = served.recorder
        start = time.perf_counter()
        try:
            result = await served.batcher.submit(inputs, outputs)
        except (ResourceExhausted, Unavailable) as e:
            log.debug("shadow '%s' of '%s' skipped a request: %s", served.name, model, e)
            return
        except Exception as e:  # a shadow failing must never show in the primary's answer
            log.warning("shadow '%s' of '%s' failed: %s", served.name, model, e)
            recorder.record_shadow(None)
            return
        finally:
            self.pending -= 1
        recorder.record_shadow(time.perf_counter() - start)  # a shadow's latency on the same traffic makes it comparable
        if primary is None:
            return
        predicted = top1(result)
        if predicted is None or predicted.shape != primary.shape:
            return
        recorder.record_agreement(bool((predicted == primary).all()))
        if predicted.shape[0] == 1:
            feedback.record_shadow(request_id, served.name, int(predicted[0]))

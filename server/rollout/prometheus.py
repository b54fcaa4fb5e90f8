"""The arms' counters summed over every replica, read from Prometheus (`--prometheus-url`), for a writer whose replicas serve too.

`PrometheusStatistics` is an `ArmStatistics` (server/rollout/gates.py) over PromQL instant queries of the
series every slimserve exports (server/telemetry/metrics.py), summed over all scraped instances: requests and errors
from slimserve_requests_total, mirrored answers and agreements from the shadow counters, feedback, device
seconds from the compute histogram's sum, and latency from slimserve_request_duration_seconds' buckets.
`refresh` runs the queries off the event loop once per look; `arm` and `latencies_since` read what it got.

Latency comes as a histogram, not as samples: each bucket's count since the stage began is spread evenly
over the bucket (histogram_quantile's assumption), so the quantile gates see latency at the buckets'
resolution (LATENCY_BUCKETS: steps of 2 to 2.5x) and decide a smaller slow-down only when it moves requests
across bucket bounds. A shadow's failed answers are not exported, so in the shadow stage its error count
is the exported one (its answers only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable

import numpy as np

from slimserve.server.errors import NotFound, Unavailable
from slimserve.server.rollout.gates import Arm

log = logging.getLogger(__name__)

# PromQL per counter, {sel} the model's selector; every query sums over replicas (instances) by variant.
QUERIES = {
    "requests": "sum by (variant, code) (slimserve_requests_total{{{sel}}})",
    "mirrored": "sum by (variant) (slimserve_shadow_requests_total{{{sel}}})",
    "agreed": "sum by (variant) (slimserve_shadow_agreements_total{{{sel}}})",
    "feedback": "sum by (variant, correct) (slimserve_feedback_total{{{sel}}})",
    "device": "sum by (variant) (slimserve_compute_duration_seconds_sum{{{sel}}})",
    "buckets": "sum by (variant, le) (slimserve_request_duration_seconds_bucket{{{sel}}})",
    "dropped": "sum by (variant, reason) (slimserve_queue_dropped_total{{{sel}}})",
}


def quote(value: str) -> str:
    """A PromQL string literal (double quotes; backslash and quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def http_query(url: str, query: str, timeout_s: float) -> list[dict]:
    """One instant query of Prometheus' HTTP API: its result vector, or Unavailable saying why not."""
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise Unavailable(f"Prometheus at {url} refused the query {query!r}: HTTP {e.code} {detail}") from e
    except (OSError, ValueError) as e:
        raise Unavailable(f"Prometheus at {url} cannot be read: {e}") from e
    if body.get("status") != "success":
        raise Unavailable(f"Prometheus at {url} answered {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def spread(bounds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Samples standing in for a histogram: each bucket (lower, upper]'s count spread evenly over it;
    the +Inf bucket's at the highest finite bound (where histogram_quantile puts them too)."""
    out = []
    lower = 0.0
    for upper, n in zip(bounds, counts):
        n = int(n)
        if n > 0:
            if math.isinf(upper):
                out.append(np.full(n, lower))
            else:
                out.append(lower + (upper - lower) * (np.arange(n) + 0.5) / n)
        if not math.isinf(upper):
            lower = float(upper)
    return np.concatenate(out) if out else np.zeros(0)


class PrometheusStatistics:
    """Every replica's traffic of a model's arms, summed by Prometheus."""

    def __init__(self, url: str, timeout_s: float = 5.0, query: Callable[[str, str, float], list[dict]] = http_query) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.source = f"prometheus {self.url} (every replica)"
        self._query = query
        self._arms: dict[tuple[str, str], Arm] = {}
        self._buckets: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # latest (bounds, cumulative counts)
        self._at_mark: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # latency mark -> cumulative counts then

    async def refresh(self, model: str, variants: Iterable[str]) -> None:
        """Reads the arms now (blocking HTTP, so on a worker thread: the event loop keeps serving)."""
        await asyncio.to_thread(self._fetch, model, tuple(variants))

    def _fetch(self, model: str, variants: tuple[str, ...]) -> None:
        sel = f"model={quote(model)}"
        results = {name: self._query(self.url, q.format(sel=sel), self.timeout_s) for name, q in QUERIES.items()}
        for variant in variants:
            rows = {name: [r for r in result if r["metric"].get("variant") == variant] for name, result in results.items()}

            def total(name: str, keep: Callable[[dict], bool] = lambda m: True, rows=rows) -> float:
                return sum(float(r["value"][1]) for r in rows[name] if keep(r["metric"]))

            by_bound: dict[float, float] = {}
            for r in rows["buckets"]:  # one row per bound after `sum by (le)`; summed here too, whatever Prometheus grouped
                bound = float(r["metric"]["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + float(r["value"][1])
            bounds = np.array(sorted(by_bound))
            cumulative = np.array([by_bound[b] for b in bounds]).round().astype(np.int64)
            mark = int(cumulative[-1]) if len(cumulative) else 0
            key = (model, variant)
            self._buckets[key] = (bounds, cumulative)
            self._at_mark.setdefault(key, {})[mark] = cumulative
            mirrored = round(total("mirrored"))
            self._arms[key] = Arm(
                # a shadow's answers are counted by the shadow counters, not slimserve_requests_total
                requests=round(total("requests")) + mirrored,
                errors=round(total("requests", lambda m: m.get("code") != "OK")),
                latency_mark=mark,
                device_seconds=total("device"),
                correct=round(total("feedback", lambda m: m.get("correct") == "true")),
                labelled=round(total("feedback")),
                agreed=round(total("agreed")),
                mirrored=mirrored,
                shed=round(total("dropped", lambda m: m.get("reason") != "cancelled")),
            )

    def arm(self, model: str, variant: str) -> Arm:
        found = self._arms.get((model, variant))
        if found is None:
            raise NotFound(f"variant '{variant}' of model '{model}' has not been read from Prometheus yet")
        return found

    def latencies_since(self, model: str, variant: str, mark: int) -> np.ndarray:
        key = (model, variant)
        bounds, now = self._buckets.get(key, (np.zeros(0), np.zeros(0, np.int64)))
        marks = self._at_mark.get(key, {})
        then = marks.get(mark)
        if then is None or len(then) != len(now):  # a mark from before the bucket layout was known: from nothing
            then = np.zeros_like(now)
        # keep the stage's mark and the latest: the controller asks for no other
        self._at_mark[key] = {mark: then, int(now[-1]) if len(now) else 0: now}
        per_bucket = np.diff(np.concatenate([[0], now - then]))
        return spread(bounds, np.maximum(per_bucket, 0))

"""``GET /metrics``: Prometheus text, read from the database at scrape time (``prometheus_client``).

=====================================  ======================================================================
``evomerge_searches{status}``          searches by status (every status, 0 included)
``evomerge_queue_depth``               searches waiting ``queued``
``evomerge_candidates_per_second``     candidates of running searches that got a result, per second, over the
                                       last minute
``evomerge_workers``                   workers of the searches this server runs
``evomerge_searches_running_here``     searches this server runs
``process_*``                          the server process (CPU, memory, open files)
=====================================  ======================================================================
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from evomerge.storage.models import utc_now

if TYPE_CHECKING:
    from evomerge.service.controller import Controller
    from evomerge.storage import Store

RATE_WINDOW_S = 60.0


class ServiceCollector(Collector):
    """The service's gauges; see the module docstring."""

    def __init__(self, store: "Store", controller: "Controller") -> None:
        self.store = store
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        counts = self.store.count_searches()
        searches = GaugeMetricFamily("evomerge_searches", "Searches by status.", labels=["status"])
        for status, n in sorted(counts.items()):
            searches.add_metric([status], n)
        yield searches
        yield GaugeMetricFamily("evomerge_queue_depth", "Searches waiting in the queue.", value=counts["queued"])
        active = [r.id for status in ("running", "cancelling")
                  for r in self.store.list_searches(status=status, limit=10_000)]
        finished = self.store.finished_since(utc_now() - timedelta(seconds=RATE_WINDOW_S), search_ids=active)
        yield GaugeMetricFamily("evomerge_candidates_per_second",
                                "Candidates of running searches finished per second over the last minute.",
                                value=finished / RATE_WINDOW_S)
        yield GaugeMetricFamily("evomerge_workers", "Workers of the searches this server runs.",
                                value=self.controller.active_workers())
        yield GaugeMetricFamily("evomerge_searches_running_here", "Searches this server runs.",
                                value=len(self.controller.running_ids()))


def registry_for(store: "Store", controller: "Controller") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(store, controller))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


__all__ = ["ServiceCollector", "registry_for", "render"]

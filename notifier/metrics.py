"""Prometheus metrics, on a registry per app (tests build many apps in one process).

Besides notifier's own: the process (CPU, memory, open files, start time), the interpreter and its garbage
collector, as the default registry of ``prometheus_client`` would show them; all without the database.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "notifier_events_received",
            "Events received, by type and outcome",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "notifier_deliveries",
            "Delivery status changes, by channel, status and reason",
            ["channel", "status", "reason"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "notifier_delivery_attempts",
            "Provider attempts, by channel and outcome",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.provider_latency = Histogram(
            "notifier_provider_call_seconds",
            "Provider call latency, by channel and provider",
            ["channel", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backlog = Gauge(
            "notifier_dispatch_backlog",
            "Deliveries waiting (queued, deferred or sending), by status",
            ["status"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "notifier_http_requests",
            "HTTP requests, by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._database_up: Gauge | None = None
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def database_answered(self, up: bool) -> None:
        """Record whether the database answered (``notifier_database_up``): the API's /metrics and /readyz ask it.

        The gauge exists from the first answer on, so a worker's exporter (which never asks) does not show a 0.
        """
        if self._database_up is None:
            self._database_up = Gauge(
                "notifier_database_up",
                "1 if the database answered the last /metrics or /readyz in time, else 0",
                registry=self.registry,
            )
        self._database_up.set(1 if up else 0)

    def delivery_status(self, channel: str, status: str, reason: str | None) -> None:
        self.deliveries.labels(channel=channel, status=status, reason=reason or "").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

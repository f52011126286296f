"""Prometheus metrics, on a registry per app (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def delivery_status(self, channel: str, status: str, reason: str | None) -> None:
        self.deliveries.labels(channel=channel, status=status, reason=reason or "").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

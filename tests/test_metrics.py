"""GET /metrics after real traffic: events, delivery statuses (from ingest on), attempts, latency, backlog."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable

import asyncpg
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import col

from notifier.api.ops import METRICS_DATABASE_SECONDS
from notifier.db.models import Delivery
from tests.api.test_deliveries import payment
from tests.conftest import PG_ADMIN, Service, booking_event, make_settings, running_service
from tests.fakes.base import Fault
from tests.fakes.onesignal import OneSignalFake

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(svc: Service) -> Samples:
    response = await svc.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 for a label set never observed (that is what Prometheus would show)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_after_real_traffic(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]], onesignal_fake: OneSignalFake
) -> None:
    async with service_factory(
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url,
    ) as svc:
        onesignal_fake.fail_next(Fault.http(500))
        assert (await svc.post_event(payment("user-1"))).status_code == 202
        await svc.drain()  # push: 500 (retry) then sent
        onesignal_fake.forget("user-2")
        assert (await svc.post_event(payment("user-2"))).status_code == 202
        await svc.drain()  # push: not_subscribed (failed)
        keyed = booking_event(idempotency_key="booking-1")
        assert (await svc.post_event(keyed)).status_code == 202
        assert (await svc.post_event(keyed)).status_code == 200  # duplicate: nothing counted twice
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).isoformat()
        assert (await svc.post_event(booking_event(recipients=["user-3"], send_at=later))).status_code == 202
        assert (await svc.post_event(booking_event(data={}))).status_code == 422
        await svc.drain()

        samples = await scrape(svc)
        async with svc.runtime.sessions() as session:
            rows = await session.execute(
                sa.select(Delivery.channel, Delivery.status, Delivery.reason, sa.func.count()).group_by(
                    col(Delivery.channel), col(Delivery.status), col(Delivery.reason)
                )
            )
            stored = {(c, s, r or ""): int(n) for c, s, r, n in rows}

    events = "notifier_events_received_total"
    assert value(samples, events, type="payment.received", outcome="accepted") == 2
    assert value(samples, events, type="booking.confirmed", outcome="accepted") == 2
    assert value(samples, events, type="booking.confirmed", outcome="duplicate") == 1
    assert value(samples, events, type="booking.confirmed", outcome="rejected") == 1

    deliveries = "notifier_deliveries_total"
    # Decided at ingest: two pushes queued, the deferred inbox message, email suppressed (no provider) x 4.
    assert value(samples, deliveries, channel="push", status="queued", reason="") == 3  # 2 at ingest + 1 retry
    assert value(samples, deliveries, channel="in_app", status="deferred", reason="") == 1
    assert value(samples, deliveries, channel="email", status="suppressed", reason="channel_unavailable") == 4
    assert value(samples, deliveries, channel="push", status="sent", reason="") == 1
    assert value(samples, deliveries, channel="push", status="failed", reason="not_subscribed") == 1
    # Every terminal row in the table was counted exactly once on its way there.
    for (channel, status, reason), count in stored.items():
        if status in ("sent", "failed", "suppressed"):
            assert value(samples, deliveries, channel=channel, status=status, reason=reason) == count
    assert stored[("in_app", "sent", "")] == 3

    attempts = "notifier_delivery_attempts_total"
    assert value(samples, attempts, channel="push", outcome="retry") == 1
    assert value(samples, attempts, channel="push", outcome="sent") == 1
    assert value(samples, attempts, channel="push", outcome="failed") == 1
    assert value(samples, attempts, channel="in_app", outcome="sent") == 3

    latency = "notifier_provider_call_seconds"
    assert value(samples, f"{latency}_count", channel="push", provider="onesignal") == 3
    assert value(samples, f"{latency}_sum", channel="push", provider="onesignal") > 0
    assert value(samples, f"{latency}_bucket", channel="push", provider="onesignal", le="+Inf") == 3
    assert value(samples, f"{latency}_count", channel="in_app", provider="inbox") == 3

    backlog = "notifier_dispatch_backlog"
    assert value(samples, backlog, status="deferred") == 1
    assert value(samples, backlog, status="queued") == 0
    assert ("notifier_dispatch_backlog", frozenset({("status", "sending")})) in samples

    requests = "notifier_http_requests_total"
    assert value(samples, requests, route="/v1/events", method="POST", status="202") == 4
    assert value(samples, requests, route="/v1/events", method="POST", status="422") == 1


async def test_event_type_labels_are_catalog_types_or_unknown(service: Service) -> None:
    # /metrics is public: a caller must not be able to mint label values (one time series per string sent).
    for sent in ["no.such.type", "x" * 100, "<script>", 42, None]:
        assert (await service.post_event(booking_event(type=sent))).status_code == 422
    assert (
        await service.client.post(
            "/v1/events", content=b"[1]", headers={**service.auth, "Content-Type": "application/json"}
        )
    ).status_code == 422
    assert (await service.post_event(booking_event(data={}))).status_code == 422  # a catalog type, rejected

    samples = await scrape(service)
    events = "notifier_events_received_total"
    labelled = {dict(labels)["type"] for name, labels in samples if name == events}
    assert labelled == {"unknown", "booking.confirmed"}
    assert value(samples, events, type="unknown", outcome="rejected") == 6
    assert value(samples, events, type="booking.confirmed", outcome="rejected") == 1


async def test_metrics_show_the_process_and_that_the_database_answered(service: Service) -> None:
    samples = await scrape(service)
    assert value(samples, "notifier_database_up") == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_cpu_seconds_total") > 0
    assert any(name == "python_gc_collections_total" for name, _ in samples)


async def test_metrics_do_not_wait_for_a_database_that_does_not_answer(postgres_url: str) -> None:
    # The backlog query blocks behind a lock; the scrape answers without it, in about METRICS_DATABASE_SECONDS.
    async with running_service(make_settings(postgres_url, embedded_dispatcher=False)) as svc:
        locker = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + postgres_url.rsplit("/", 1)[1])
        try:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            samples = await scrape(svc)
            waited = time.monotonic() - started
            await transaction.rollback()
        finally:
            await locker.close()
        assert value(samples, "notifier_database_up") == 0
        assert not any(name == "notifier_dispatch_backlog" for name, _ in samples)
        assert METRICS_DATABASE_SECONDS <= waited < METRICS_DATABASE_SECONDS + 3
        assert value(await scrape(svc), "notifier_database_up") == 1

"""Prometheus metrics, created on an injected `CollectorRegistry` (never the global one).

Names follow Prometheus conventions: `medrelay_<thing>_<unit>`, counters end in `_total`, base
units (seconds, bytes). No label ever carries a user, device, thread or message: labels are small
fixed sets (an operation name, a reason, an outcome), pre-initialised so rates see zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

AUTH_FAILURE_REASONS: Final = (
    "bad_signature",
    "unknown_device",
    "revoked",
    "token_invalid",
    "timeout",
)
SEND_OUTCOMES: Final = (
    "stored",
    "duplicate",
    "stale_devices",
    "queue_full",
    "id_conflict",
    "unknown_user",
    "forbidden",
    "server_busy",
)
VISIT_EVENTS: Final = ("opened", "closed")
# Send-to-deliver latency: sub-millisecond to minutes (an offline device is delivered later).
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
)  # fmt: skip
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class RelayMetrics:
    connections: Gauge
    envelopes_received: Counter
    envelopes_delivered: Counter
    sends: Counter
    send_to_deliver: Histogram
    group_commit_batch: Histogram
    auth_failures: Counter
    enrollments: Counter
    expired: Counter
    after_hours: Counter
    held: Counter
    released: Counter
    auto_replies: Counter
    urgent: Counter
    first_reply: Histogram
    visits: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RelayMetrics:
        connections = Gauge(
            "medrelay_connections",
            "Client connections by state.",
            ["state"],
            registry=registry,
        )
        for state in ("handshaking", "authenticated"):
            connections.labels(state)
        sends = Counter(
            "medrelay_sends_total",
            "Send requests by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in SEND_OUTCOMES:
            sends.labels(outcome)
        auth_failures = Counter(
            "medrelay_auth_failures_total",
            "Failed device logins by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in AUTH_FAILURE_REASONS:
            auth_failures.labels(reason)
        enrollments = Counter(
            "medrelay_enrollments_total",
            "Enrollment attempts by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("enrolled", "refused"):
            enrollments.labels(outcome)
        urgent = Counter(
            "medrelay_urgent_escalations_total",
            "Urgent patient messages to a clinician outside their hours, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("routed", "nobody_on_call"):
            urgent.labels(outcome)
        visits = Counter(
            "medrelay_visits_total",
            "Teleconsultation visits opened and closed.",
            ["event"],
            registry=registry,
        )
        for event in VISIT_EVENTS:
            visits.labels(event)
        return cls(
            connections=connections,
            envelopes_received=Counter(
                "medrelay_envelopes_received_total",
                "Envelopes durably stored for delivery (one per target device).",
                registry=registry,
            ),
            envelopes_delivered=Counter(
                "medrelay_envelopes_delivered_total",
                "Envelopes acknowledged by their recipient device.",
                registry=registry,
            ),
            sends=sends,
            send_to_deliver=Histogram(
                "medrelay_send_to_deliver_seconds",
                "Time from storing an envelope to pushing it to its device.",
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            group_commit_batch=Histogram(
                "medrelay_group_commit_batch_size",
                "Writes (sends and acknowledgements) per group-commit transaction.",
                buckets=_BATCH_BUCKETS,
                registry=registry,
            ),
            auth_failures=auth_failures,
            enrollments=enrollments,
            expired=Counter(
                "medrelay_envelopes_expired_total",
                "Envelopes deleted undelivered after their time to live.",
                registry=registry,
            ),
            after_hours=Counter(
                "medrelay_after_hours_messages_total",
                "Patients' messages that reached a clinician outside their hours.",
                registry=registry,
            ),
            held=Counter(
                "medrelay_held_envelopes_total",
                "Envelopes held for a clinician's hours.",
                registry=registry,
            ),
            released=Counter(
                "medrelay_released_envelopes_total",
                "Held envelopes moved to their device's queue at the clinician's opening.",
                registry=registry,
            ),
            auto_replies=Counter(
                "medrelay_auto_replies_total",
                "Automatic replies (clinic-signed notices) sent to patients.",
                registry=registry,
            ),
            urgent=urgent,
            first_reply=Histogram(
                "medrelay_first_reply_seconds",
                "Time from a patient's message to the clinician's first reply.",
                buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800),
                registry=registry,
            ),
            visits=visits,
        )

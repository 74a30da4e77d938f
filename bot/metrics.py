"""Prometheus metrics for one engine: what `/metrics` serves.

Each engine owns its registry (no process-global state), so tests and benchmarks can run
several engines side by side; the HTTP server renders the registry of the engine it serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "drawbridge_jobs",
            "Jobs that ended, by outcome, provider and model.",
            ["status", "provider", "model"],
            registry=self.registry,
        )
        self.submitted = Counter(
            "drawbridge_jobs_submitted",
            "Jobs accepted into the queue.",
            ["platform", "model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "drawbridge_requests_rejected",
            "Requests answered with an error at submit, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.images = Counter(
            "drawbridge_images",
            "Images generated and stored.",
            ["provider", "model"],
            registry=self.registry,
        )
        self.spend = Counter(
            "drawbridge_spend_usd",
            "Dollars charged for succeeded jobs.",
            ["provider", "model"],
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "drawbridge_provider_errors",
            "Failed provider calls, by provider and error kind.",
            ["provider", "kind"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "drawbridge_deliveries",
            "Results posted to a platform, by platform and outcome.",
            ["platform", "outcome"],
            registry=self.registry,
        )
        self.paid_messages = Counter(
            "drawbridge_paid_messages",
            "Messages sent on a platform's paid lane (Telegram paid broadcasts, 0.1 Star each).",
            ["platform"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "drawbridge_queue_depth", "Jobs waiting to start.", registry=self.registry
        )
        self.in_flight = Gauge(
            "drawbridge_in_flight", "Jobs generating or delivering now.", registry=self.registry
        )
        self.generate_seconds = Histogram(
            "drawbridge_generate_seconds",
            "Time from start to stored images, for succeeded jobs.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.total_seconds = Histogram(
            "drawbridge_job_seconds",
            "Time from submit to delivered, for delivered jobs.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "drawbridge_queue_wait_seconds",
            "Time from submit to start.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own so that two
servers in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("jft_requests", "Finished requests by finish reason "
                                "(stop, length, cancelled, error).", ["finish_reason"],
                                registry=registry)
        self.prompt_tokens = Counter("jft_prompt_tokens", "Prompt tokens prefilled.",
                                     registry=registry)
        self.generated_tokens = Counter("jft_generated_tokens", "Tokens generated.",
                                        registry=registry)
        self.running = Gauge("jft_running_requests", "Requests holding a batch slot.",
                             registry=registry)
        self.waiting = Gauge("jft_waiting_requests", "Requests queued for a slot.",
                             registry=registry)
        self.batch_occupancy = Gauge("jft_batch_occupancy", "Share of the batch slots in use "
                                     "at the last decode step.", registry=registry)
        self.adapter_loads = Counter("jft_adapter_loads", "Adapters moved to the device.",
                                     registry=registry)
        self.adapter_evictions = Counter("jft_adapter_evictions", "Adapters evicted from "
                                         "the device to make room.", registry=registry)
        self.adapters_read = Counter("jft_adapters_read", "Adapters read from disk into "
                                     "host memory.", registry=registry)
        self.adapters_on_device = Gauge("jft_adapters_on_device", "Adapters on the device.",
                                        registry=registry)
        self.queue_time = Histogram("jft_queue_time_seconds", "From arrival to a batch slot.",
                                    buckets=_LATENCY_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram("jft_time_to_first_token_seconds",
                                             "From arrival to the first token.",
                                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.decode_step = Histogram("jft_decode_step_seconds", "One decode step of the batch.",
                                     buckets=_LATENCY_BUCKETS, registry=registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

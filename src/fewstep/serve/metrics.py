"""Prometheus metrics of ``fewstep serve`` (``GET /metrics``), named as vLLM's with a ``fewstep:`` prefix.

Counted per prompt (a completions request with a list prompt counts each of its prompts), when the
engine finishes it; errors per HTTP error answer (or error event of a stream). See docs/serving.md.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fewstep.decoding.text import Completion

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# the buckets of vLLM's histograms of the same names
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
NFE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TPF_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


class Metrics:
    """The server's metrics in a registry of its own (several apps can live in one process)."""

    def __init__(self, gen: Any, max_batch: int):
        prometheus_client.disable_created_metrics()  # no *_created series, as vLLM
        r = self.registry = CollectorRegistry()
        p = "fewstep:"
        running = Gauge(p + "num_requests_running", "Requests in the engine's running set.", registry=r)
        running.set_function(lambda: min(gen.active(), max_batch))
        waiting = Gauge(p + "num_requests_waiting", "Requests waiting for a row in the running set.", registry=r)
        waiting.set_function(lambda: max(0, gen.active() - max_batch))
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Time from a request's submission to the engine to its last token, in seconds.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from submission to the first final text (the first delta a stream sends), in seconds.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            p + "generation_tokens", "Tokens of the text returned to finished requests.", registry=r
        )
        self.forwards = Counter(
            p + "forwards", "Model forwards (NFE) of finished requests, each request's own.", registry=r
        )
        self.request_forwards = Histogram(
            p + "request_forwards", "Model forwards (NFE) per finished request.", buckets=NFE_BUCKETS, registry=r
        )
        self.tokens_per_forward = Histogram(
            p + "tokens_per_forward",
            "Answer tokens before the first EOS per forward, per finished request.",
            buckets=TPF_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            p + "request_success",
            "Finished requests by finish reason (stop, length, abort: the client went away).",
            ["finished_reason"],
            registry=r,
        )
        self.errors = Counter(
            p + "request_errors", "Error answers by kind (the error's code, else its type) and status.",
            ["kind", "status"], registry=r,
        )  # fmt: skip
        for reason in ("stop", "length", "abort"):
            self.success.labels(reason)

    def finished(self, comp: Completion) -> None:
        """Count a request the engine finished (``error`` ones are counted as error answers)."""
        reason = FINISH_REASONS.get(comp.finish_reason)
        if reason is None:
            return
        self.success.labels(reason).inc()
        if reason == "abort":
            return
        self.e2e.observe(comp.latency_s)
        # an empty answer's first (and only) text is its end
        self.ttft.observe(comp.latency_s if comp.first_delta_s is None else comp.first_delta_s)
        self.prompt_tokens.inc(comp.prompt_tokens)
        self.generation_tokens.inc(comp.completion_tokens)
        self.forwards.inc(comp.nfe)
        self.request_forwards.observe(comp.nfe)
        if comp.nfe:
            self.tokens_per_forward.observe(comp.tokens_per_forward)

    def error(self, status: int, kind: str) -> None:
        self.errors.labels(kind, str(status)).inc()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

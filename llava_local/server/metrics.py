"""The server's Prometheus metrics (GET /metrics), in a registry of its own.

    llava_local_requests_total{status}            answered requests by HTTP status
    llava_local_prompt_tokens_total               prompt positions (text + image) of answered requests
    llava_local_prompt_tokens_evaluated_total     of which evaluated; the rest came from a conversation's KV cache
    llava_local_prompt_tokens_cached_total        ... reused from the KV cache (multi-turn chats)
    llava_local_completion_tokens_total           generated tokens
    llava_local_image_encodes_total               images run through the vision encoder
    llava_local_image_cache_hits_total            images whose embeddings were cached
    llava_local_kv_cache_hits_total               requests that extended a conversation kept in the KV cache
    llava_local_queue_depth / _requests_in_flight requests waiting for a sequence / accepted and not answered
    llava_local_engine_restarts_total             engine processes that died and were restarted
    llava_local_time_to_first_token_seconds       histogram: request received -> first token
    llava_local_decode_seconds                    histogram: first token -> last token
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DECODE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_COUNTERS = (   # attribute, metric name (Prometheus adds _total), help
    ("prompt_tokens", "llava_local_prompt_tokens", "Prompt positions of answered requests"),
    ("prompt_evaluated", "llava_local_prompt_tokens_evaluated", "Prompt positions evaluated"),
    ("prompt_cached", "llava_local_prompt_tokens_cached", "Prompt positions reused from a conversation's KV cache"),
    ("completion_tokens", "llava_local_completion_tokens", "Generated tokens"),
    ("image_encodes", "llava_local_image_encodes", "Images run through the vision encoder"),
    ("image_cache_hits", "llava_local_image_cache_hits", "Images whose embeddings were cached"),
    ("kv_cache_hits", "llava_local_kv_cache_hits", "Requests that extended a conversation kept in the KV cache"),
    ("restarts", "llava_local_engine_restarts", "Engine processes restarted after dying"),
)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llava_local_requests", "Answered requests by HTTP status", ["status"], registry=r)
        for attr, name, doc in _COUNTERS:
            setattr(self, attr, Counter(name, doc, registry=r))
        self.queue_depth = Gauge("llava_local_queue_depth", "Requests waiting for a sequence", registry=r)
        self.in_flight = Gauge("llava_local_requests_in_flight", "Requests accepted and not answered", registry=r)
        self.ttft = Histogram("llava_local_time_to_first_token_seconds", "Request received to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.decode = Histogram("llava_local_decode_seconds", "First token to last token",
                                buckets=_DECODE_BUCKETS, registry=r)

    def answered(self, result: dict, ttft: float) -> None:
        """A finished answer's figures (the engine's "done" result)."""
        self.prompt_tokens.inc(result["prompt_tokens"])
        self.prompt_evaluated.inc(result["prompt_tokens"] - result["cached_tokens"])
        self.prompt_cached.inc(result["cached_tokens"])
        if result["cached_tokens"]:
            self.kv_cache_hits.inc()
        self.completion_tokens.inc(result["completion_tokens"])
        self.image_encodes.inc(result["images_encoded"])
        self.image_cache_hits.inc(result["image_cache_hits"])
        self.ttft.observe(ttft)
        self.decode.observe(result["decode_s"])

    def load(self, in_flight: int, parallel: int) -> None:
        self.in_flight.set(in_flight)
        self.queue_depth.set(max(0, in_flight - parallel))

    def render(self) -> bytes:
        return generate_latest(self.registry)

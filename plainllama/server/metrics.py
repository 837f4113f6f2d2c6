"""GET /metrics: counters and gauges in Prometheus's text exposition format (version 0.0.4)."""

from __future__ import annotations

import collections
import threading


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def text(self, scheduler) -> str:
        lines = [
            "# HELP plainllama_requests_total HTTP requests answered, by endpoint and status.",
            "# TYPE plainllama_requests_total counter",
        ]
        with self.lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'plainllama_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        gauges: list[tuple[str, str, str, float]] = [
            ("model_loaded", "gauge", "1 once the model is loaded and requests are served.", scheduler is not None),
        ]
        if scheduler is not None:
            prefix = scheduler.prefix_cache
            rate = scheduler.generated_tokens / scheduler.decode_seconds if scheduler.decode_seconds else 0.0
            gauges += [
                ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", scheduler.prefilled_tokens),
                ("generated_tokens_total", "counter", "Tokens generated.", scheduler.generated_tokens),
                ("decode_steps_total", "counter", "Decode steps (one pass over the weights each).", scheduler.steps),
                ("queue_length", "gauge", "Requests waiting for a slot in the batch.", scheduler.queue_length),
                ("running_requests", "gauge", "Requests in the batch (prefilling or decoding).", scheduler.batch_size),
                ("batch_size", "gauge", "Sequences decoded together in the last step.", scheduler.last_batch),
                (
                    "prefix_cache_hits_total",
                    "counter",
                    "Requests that reused a cached prompt prefix.",
                    prefix.hits if prefix else 0,
                ),
                (
                    "prefix_cache_tokens_total",
                    "counter",
                    "Prompt tokens read from the prefix cache, not prefilled.",
                    prefix.reused_tokens if prefix else 0,
                ),
                ("prefix_cache_bytes", "gauge", "Memory the prefix cache holds.", prefix.nbytes if prefix else 0),
                ("tokens_per_second", "gauge", "Generated tokens per second of decoding, since start.", round(rate, 3)),
            ]
        for name, kind, help_text, value in gauges:
            lines += [f"# HELP plainllama_{name} {help_text}", f"# TYPE plainllama_{name} {kind}"]
            lines.append(f"plainllama_{name} {float(value) if isinstance(value, float) else int(value)}")
        return "\n".join(lines) + "\n"

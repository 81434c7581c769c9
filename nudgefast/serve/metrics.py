"""Prometheus text exposition (format 0.0.4) of the server's metrics, written by hand: a handful of
counters and two histograms do not need a client library. Everything is updated and read on the
server's event loop, so there is no locking."""
from __future__ import annotations

import bisect

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self):
        self.generation_tokens = 0
        self.nudged_tokens = 0
        self.prompt_tokens = {"base": 0, "nudger": 0}
        self.responses: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def count_response(self, path: str, status: int) -> None:
        key = (path, status)
        self.responses[key] = self.responses.get(key, 0) + 1

    def render(self, counts: dict, kv_usage: dict, pending: int) -> str:
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

        metric("nudgefast_requests_running", "gauge", "Requests being decoded by the engine.",
               [({}, counts.get("running", 0))])
        metric("nudgefast_requests_waiting", "gauge", "Requests admitted by the engine, waiting for KV pages or a slot.",
               [({}, counts.get("waiting", 0))])
        metric("nudgefast_requests_pending", "gauge", "Generation requests the HTTP server is handling.",
               [({}, pending)])
        for key, help_ in (("finished", "Requests the engine finished."), ("aborted", "Requests aborted."),
                           ("preempted", "Times a running request was preempted.")):
            metric(f"nudgefast_requests_{key}_total", "counter", help_, [({}, counts.get(key, 0))])
        metric("nudgefast_kv_pages_used", "gauge", "KV cache pages in use, per model.",
               [({"model": m}, u["used"]) for m, u in kv_usage.items()])
        metric("nudgefast_kv_pages_total", "gauge", "KV cache pages in the pool, per model.",
               [({"model": m}, u["total"]) for m, u in kv_usage.items()])
        metric("nudgefast_prompt_tokens_total", "counter", "Prompt tokens prefilled, per model.",
               [({"model": m}, v) for m, v in self.prompt_tokens.items()])
        metric("nudgefast_generation_tokens_total", "counter", "Completion tokens written.",
               [({}, self.generation_tokens)])
        metric("nudgefast_nudged_tokens_total", "counter", "Completion tokens the nudger wrote.",
               [({}, self.nudged_tokens)])
        metric("nudgefast_http_responses_total", "counter", "HTTP responses by endpoint and status.",
               [({"path": p, "status": s}, c) for (p, s), c in sorted(self.responses.items())])
        lines.append("# HELP nudgefast_time_to_first_token_seconds Request arrival to the first token.")
        lines.append("# TYPE nudgefast_time_to_first_token_seconds histogram")
        lines += self.ttft.lines("nudgefast_time_to_first_token_seconds")
        lines.append("# HELP nudgefast_inter_token_latency_seconds Time between successive engine outputs of a "
                     "request.")
        lines.append("# TYPE nudgefast_inter_token_latency_seconds histogram")
        lines += self.itl.lines("nudgefast_inter_token_latency_seconds")
        return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """'name{labels}' -> value, for tests and the benchmark (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out

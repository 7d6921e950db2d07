"""What `GET /metrics` reports, in Prometheus' text format.

Counted by the gateway as requests pass through it: requests by route and
status, time to first token and time between tokens (histograms, seconds),
prompt, cached and completion tokens, and KV cache use by where the reused
prefix came from (`live`, `ram`, `disk`, `none`). Asked of the supervisor when
scraped: per model, its queue depth and whether its worker is busy.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence

from bastion.protocol import GenerationStats, WorkerState
from bastion.protocol.control import ModelStatus

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _label(value: str) -> str:
    """A label value as Prometheus' text format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> Iterable[str]:
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            yield f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {running}'
        yield f"{name}_sum{{{labels}}} {self.total}"
        yield f"{name}_count{{{labels}}} {self.count}"


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = {}
        self.inter_token: dict[str, Histogram] = {}
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.cache: dict[tuple[str, str], int] = defaultdict(int)

    def request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.setdefault(model, Histogram(_TTFT_BUCKETS)).observe(seconds)

    def between_tokens(self, model: str, seconds: float) -> None:
        self.inter_token.setdefault(model, Histogram(_ITL_BUCKETS)).observe(seconds)

    def generation(self, model: str, stats: GenerationStats) -> None:
        self.tokens[(model, "prompt")] += stats.prompt_tokens
        self.tokens[(model, "cached")] += stats.cached_tokens
        self.tokens[(model, "completion")] += stats.completion_tokens
        self.cache[(model, stats.cache_source.value)] += 1

    def render(self, models: Sequence[ModelStatus]) -> str:
        out = [
            "# HELP bastion_http_requests_total HTTP requests answered, by route and status.",
            "# TYPE bastion_http_requests_total counter",
            *(f'bastion_http_requests_total{{route="{route}",status="{status}"}} {n}'
              for (route, status), n in sorted(self.requests.items())),
            "# HELP bastion_time_to_first_token_seconds Time from request to the first token.",
            "# TYPE bastion_time_to_first_token_seconds histogram",
        ]  # fmt: skip
        for model, histogram in sorted(self.ttft.items()):
            out += histogram.lines("bastion_time_to_first_token_seconds", f'model="{_label(model)}"')
        out += ["# HELP bastion_inter_token_seconds Time between two streamed tokens.",
                "# TYPE bastion_inter_token_seconds histogram"]  # fmt: skip
        for model, histogram in sorted(self.inter_token.items()):
            out += histogram.lines("bastion_inter_token_seconds", f'model="{_label(model)}"')
        out += ["# HELP bastion_tokens_total Tokens by kind: prompt, cached (of the prompt), completion.",
                "# TYPE bastion_tokens_total counter",
                *(f'bastion_tokens_total{{model="{_label(model)}",kind="{kind}"}} {n}'
                  for (model, kind), n in sorted(self.tokens.items())),
                "# HELP bastion_kv_cache_generations_total Generations by where their reused KV prefix came from.",
                "# TYPE bastion_kv_cache_generations_total counter",
                *(f'bastion_kv_cache_generations_total{{model="{_label(model)}",source="{source}"}} {n}'
                  for (model, source), n in sorted(self.cache.items())),
                "# HELP bastion_model_queue_depth Generations waiting for the model's worker.",
                "# TYPE bastion_model_queue_depth gauge",
                *(f'bastion_model_queue_depth{{model="{_label(m.name)}"}} {m.queued}' for m in models),
                "# HELP bastion_model_busy_workers Workers generating right now (0 or 1 per model).",
                "# TYPE bastion_model_busy_workers gauge",
                *(f'bastion_model_busy_workers{{model="{_label(m.name)}"}} {int(m.state is WorkerState.BUSY)}'
                  for m in models)]  # fmt: skip
        return "\n".join(out) + "\n"

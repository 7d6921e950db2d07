"""Token log-probabilities in the three shapes the gateway's APIs give them.

The worker reports one `token_logprobs` event per generated token, just before
the token's text (reasoning and call text included: they are tokens the model
generated). `LogprobTrail` keeps the ones not yet sent, so each streamed chunk
carries the tokens that arrived since the previous one and the last chunk (or
the whole response) carries the rest. Formatting lives here so the OpenAI chat,
OpenAI legacy completions and Ollama routes agree on what a token is.
"""

from __future__ import annotations

from typing import Any

from bastion.protocol import TokenChoice, TokenLogprobs


class LogprobTrail:
    """The log-probability reports of one response; empty when none were asked for."""

    def __init__(self) -> None:
        self.all: list[TokenLogprobs] = []
        self._sent = 0

    def add(self, event: TokenLogprobs) -> None:
        self.all.append(event)

    def take(self) -> list[TokenLogprobs]:
        """The reports since the previous `take`."""
        fresh = self.all[self._sent :]
        self._sent = len(self.all)
        return fresh


def _openai_token(choice: TokenChoice) -> dict[str, Any]:
    return {"token": choice.token, "logprob": choice.logprob, "bytes": list(choice.token_bytes)}


def openai_chat(reports: list[TokenLogprobs]) -> dict[str, Any]:
    """A chat choice's `logprobs`: `{content: [{token, logprob, bytes, top_logprobs}]}`."""
    content = [{**_openai_token(r.chosen), "top_logprobs": [_openai_token(t) for t in r.top]} for r in reports]
    return {"content": content, "refusal": None}


def openai_legacy(reports: list[TokenLogprobs], offset: int = 0) -> dict[str, Any]:
    """A legacy completion choice's `logprobs`, whose `text_offset`s count characters from `offset`."""
    offsets = []
    for report in reports:
        offsets.append(offset)
        offset += len(report.chosen.token)
    return {
        "tokens": [r.chosen.token for r in reports],
        "token_logprobs": [r.chosen.logprob for r in reports],
        "top_logprobs": [{t.token: t.logprob for t in r.top} for r in reports],
        "text_offset": offsets,
    }


def ollama(reports: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """Ollama's `logprobs`: `[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]`."""
    return [{**_openai_token(r.chosen), "top_logprobs": [_openai_token(t) for t in r.top]} for r in reports]

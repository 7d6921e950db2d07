"""Noticing a reply that has started to repeat itself, token by token.

Small models loop: "That's me. That's me. That's me." until the token limit.
`RepetitionGuard.push` is fed each sampled token and says when the tail of the
reply is one span repeated back to back: a period of `p` tokens (1 ≤ p ≤
`max_period`) matched for at least `max(2 * p, min_tokens)` tokens, so the
span has occurred at least three times in a row and the repeated stretch is
long enough that ordinary text (a row of dashes, "no, no") does not trip it.

The check is incremental and cheap: for every period it keeps how many tokens
in a row have equalled the token `p` back, so each push costs O(max_period)
integer comparisons, whatever the reply's length.

`loop_start` is where the loop begins: the end of the span's first
occurrence. What came before it (that occurrence included) is the reply worth
keeping; the repeats after it are not. The earliest phase of a loop can fall
inside a word ("So, that's me. T|hat's me. That's me."), so `keep_whole_words`
moves the cut back to the end of the last whole word.
"""

from __future__ import annotations

from collections import deque


class RepetitionGuard:
    def __init__(self, *, max_period: int = 64, min_tokens: int = 32) -> None:
        self._max_period = max_period
        self._min_tokens = min_tokens
        self._recent: deque[int] = deque(maxlen=max_period + 1)
        self._runs = [0] * (max_period + 1)  # by period: tokens in a row equal to the one `period` back
        self._count = 0
        self.loop_start: int | None = None  # tokens kept before the loop, once one is found

    def push(self, token: int) -> bool:
        """Take the next token; True once the reply is looping (and from then on)."""
        if self.loop_start is not None:
            return True
        self._recent.append(token)
        self._count += 1
        recent, runs = self._recent, self._runs
        newest = len(recent) - 1
        for period in range(1, min(self._max_period, newest) + 1):
            if recent[newest - period] == token:
                runs[period] += 1
                if runs[period] >= max(2 * period, self._min_tokens):
                    # The matched stretch began `period` tokens into the loop: the first
                    # occurrence ends where the matching started.
                    self.loop_start = self._count - runs[period]
                    return True
            else:
                runs[period] = 0
        return False


def keep_whole_words(text: str, keep: int) -> int:
    """`keep` moved back out of a word it splits, and past the whitespace before it."""
    keep = max(0, min(keep, len(text)))
    cut = keep
    if 0 < cut < len(text) and text[cut - 1].isalnum() and text[cut].isalnum():
        while cut > 0 and text[cut - 1].isalnum():
            cut -= 1
    while cut > 0 and text[cut - 1].isspace():
        cut -= 1
    return cut if cut > 0 else keep  # a loop from the very first word: keep that word

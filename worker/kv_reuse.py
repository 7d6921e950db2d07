"""`KvReuse`: where the KV prefix of a request on one engine sequence comes from, and the
snapshots that make reuse possible.

Decided per request (`prepare`), best first:
  - the live sequence, cut back to the longest common prefix with the prompt;
    when turns were dropped from the middle of a session (context pruning),
    the dropped range is removed and the rest shifted down (context shift)
    instead of evaluating everything after it again;
  - the session's turn-boundary snapshot (`SnapshotStore`: RAM, then disk),
    when it covers more of the prompt than the live sequence does — after a
    session switch, a worker restart or an unload;
  - another session's snapshot (RAM, then disk) whose tokens share a longer exact
    prefix with the prompt (a stateless client that resends a conversation
    under a new name, agents that share a long system prompt), cut back to
    what is shared — worth a restore only for PREFIX_RESTORE_GAIN tokens more;
  - nothing: the whole prompt is evaluated.
`Reuse` says which (`source`) and why reuse fell short (`notes`). Snapshots are
kept at the end of each turn (`keep_snapshot`); for caches that cannot be cut
back (sliding windows), right after the prompt is evaluated instead, so that
the next turn's prompt extends them exactly. `WorkerCore` calls all of this
from the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bastion.protocol import CacheSource
from bastion.protocol.worker_wire import Generate
from bastion.worker.engine import MIN_EVALUATED, EngineError, EngineInfo, EngineSequence, common_prefix_length
from bastion.worker.kv_snapshots import SnapshotStore

log = logging.getLogger(__name__)

# A context shift must save at least this many tokens of evaluation to be
# worth moving the cache (and the small drift re-rotated keys bring).
MIN_SHIFT_GAIN = 16
# Restoring another session's snapshot replaces the live state and costs tens
# of milliseconds: only worth it for this many more reused tokens.
PREFIX_RESTORE_GAIN = 64


@dataclass(frozen=True)
class ReusePlan:
    """How much of a cached token sequence a prompt can reuse: keep `keep`
    tokens after removing `drop` tokens at `drop_at` (a context shift)."""

    keep: int
    drop_at: int = 0
    drop: int = 0
    common: int = 0  # the plain common prefix, before any feasibility check


@dataclass(frozen=True)
class Reuse:
    """What `prepare` left in the KV state for a prompt."""

    cached_tokens: int
    source: CacheSource
    shifted_tokens: int = 0  # tokens of dropped turns removed in place (a context shift)
    notes: tuple[str, ...] = ()


class KvReuse:
    def __init__(self, sequence: EngineSequence, info: EngineInfo, snapshots: SnapshotStore | None) -> None:
        self._sequence = sequence
        self._info = info
        self._snapshots = snapshots
        self._can_shift = info.partial_reuse and sequence.can_shift()

    def prepare(self, session: str, tokens: Sequence[int]) -> Reuse:
        """Bring the KV state to the longest reusable prefix of `tokens` (see the module
        docstring); what is left to evaluate is `tokens[reuse.cached_tokens:]`."""
        sequence = self._sequence
        notes: list[str] = []
        shifted = 0
        live = sequence.kv_token_ids()
        plan = self.plan(live, tokens, live=True)
        source = CacheSource.LIVE
        if plan.common > plan.keep + plan.drop and not self._info.partial_reuse:
            notes.append(
                f"the sliding-window cache cannot be cut back to the {plan.common} tokens it shares with the prompt"
            )
        if self._snapshots is not None and session and plan.keep < len(tokens) - MIN_EVALUATED:
            lookup = self._snapshots.tokens_of(session)
            if lookup.note:
                notes.append(lookup.note)
            if lookup.tokens is not None:
                candidate = self.plan(lookup.tokens, tokens, live=False)
                if candidate.keep > plan.keep:
                    restored, touched = self._restore(session, notes)
                    if restored is not None:
                        plan, source = candidate, restored
                    elif touched:  # the live state is gone too
                        plan = ReusePlan(keep=0)
        if self._snapshots is not None and plan.keep < len(tokens) - MIN_EVALUATED:
            plan, source = self._reuse_shared_prefix(tokens, session, plan, source, notes)
        if plan.drop:
            try:
                sequence.shift_out(plan.drop_at, plan.drop_at + plan.drop)
                shifted = plan.drop
            except EngineError as exc:  # an optimisation that cannot run costs a prefill, not the request
                notes.append(f"context shift refused ({exc}); prefilled the whole prompt")
                plan = ReusePlan(keep=0)
        cached = sequence.keep_prefix(tokens) if plan.keep else self._start_over()
        if cached == 0:
            source = CacheSource.NONE
        if source is not CacheSource.LIVE and notes and not self._info.partial_reuse:
            notes.append("restored the turn-boundary snapshot" if cached else "prefilled the whole prompt")
        return Reuse(cached_tokens=cached, source=source, shifted_tokens=shifted, notes=tuple(notes))

    def _reuse_shared_prefix(self, tokens: Sequence[int], session: str, plan: ReusePlan, source: CacheSource,
                             notes: list[str]) -> tuple[ReusePlan, CacheSource]:
        """Another session's snapshot, when its tokens share more of the prompt (exactly, token for token)."""
        assert self._snapshots is not None
        found = self._snapshots.longest_prefix(tokens, at_least=plan.keep + PREFIX_RESTORE_GAIN)
        if found is None or found[0] == session:
            return plan, source
        other, other_tokens, _shared = found
        candidate = self.plan(other_tokens, tokens, live=False)
        if candidate.keep < plan.keep + PREFIX_RESTORE_GAIN or candidate.drop:
            return plan, source
        restored, touched = self._restore(other, notes)
        if restored is None:
            return (ReusePlan(keep=0) if touched else plan), source
        return ReusePlan(keep=candidate.keep, common=candidate.common), restored

    def _start_over(self) -> int:
        self._sequence.reset()
        return 0

    def _restore(self, session: str, notes: list[str]) -> tuple[CacheSource | None, bool]:
        """(where the restored state came from, or None; whether the engine's
        state was replaced — a refused restore leaves nothing live)."""
        assert self._snapshots is not None
        snapshot, from_disk, note = self._snapshots.load(session)
        if note:
            notes.append(note)
        if snapshot is None:
            return None, False
        if not self._sequence.restore_sequence(snapshot.data, snapshot.tokens):
            notes.append(self._snapshots.discard(session, "the engine refused its state"))
            return None, True
        return (CacheSource.DISK if from_disk else CacheSource.RAM), True

    def plan(self, cached: Sequence[int], wanted: Sequence[int], *, live: bool) -> ReusePlan:
        """The best reuse of `cached` for prompt `wanted`: the common prefix,
        or, when a context shift can save more, the prefix plus what follows a
        range of `cached` that the prompt no longer has (pruned turns)."""
        common = common_prefix_length(cached, wanted)
        limit = len(wanted) - MIN_EVALUATED
        keep = max(0, min(common, limit))
        if keep < len(cached) and not self._can_cut(keep, live):
            keep = 0
        best = ReusePlan(keep=keep, common=common)
        if not self._can_shift or common >= len(cached) or common >= limit or common == 0:
            return best
        for drop_at, drop, matched in _shift_candidates(cached, wanted, common):
            reuse = min(common + matched, limit)
            if reuse - best.keep >= MIN_SHIFT_GAIN and reuse > best.keep:
                best = ReusePlan(keep=reuse, drop_at=drop_at, drop=drop, common=common)
        return best

    def _can_cut(self, keep: int, live: bool) -> bool:
        if keep <= 0:
            return False
        if self._info.partial_reuse:
            return True
        # A sliding window: the live state knows how far back it still reaches;
        # a snapshot was taken where the next prompt extends it, and no earlier.
        return self._sequence.can_truncate_to(keep) if live else False

    def keep_snapshot(self, request: Generate, *, durable: bool = False) -> None:
        """Keep the session's state for its next turn (a session switch, a
        restart). Never fails the request: a snapshot is an optimisation."""
        if self._snapshots is None or not request.snapshot or not request.session_id:
            return
        try:
            data = self._sequence.save_sequence()
            self._snapshots.put(request.session_id, self._sequence.kv_token_ids(), data, durable=durable)
        except Exception:
            log.exception("snapshot of session %r failed", request.session_id)


MAX_SHIFT_CANDIDATES = 64


def _shift_candidates(cached: Sequence[int], wanted: Sequence[int], common: int):
    """(drop_at, drop, matched) for each place where `cached`, after skipping
    a range that starts at `common`, goes on the way `wanted` does; matched is
    how far it keeps agreeing. Compares in place: no copies per candidate."""
    first, tried = wanted[common], 0
    for start in range(common + 1, len(cached)):
        if cached[start] != first:
            continue
        matched, limit = 0, min(len(cached) - start, len(wanted) - common)
        while matched < limit and cached[start + matched] == wanted[common + matched]:
            matched += 1
        yield common, start - common, matched
        tried += 1
        if tried >= MAX_SHIFT_CANDIDATES:
            return

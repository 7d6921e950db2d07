"""Which server of a remote model serves which session (worker/remote/backends.py): affinity,
placement by load, taking a failed server out and back, and the check of a server's cache claims."""

from __future__ import annotations

from bastion.worker.remote.backends import Backends


def test_sessions_stay_where_they_were_placed_and_new_ones_go_to_the_least_busy() -> None:
    backends = Backends(("http://a", "http://b"))
    a, b = list(backends)
    a.in_flight = 2
    assert backends.place("s1").backend is b  # a is busier
    backends.served("s1", b, "ok", 10, 0, "prompt one")
    a.in_flight = 0
    assert backends.place("s2").backend is a  # as idle as b, with fewer sessions
    backends.served("s2", a, "ok", 10, 0, "prompt two")
    b.in_flight = 5
    assert backends.place("s1").backend is b  # affinity beats load: its prompt is cached there
    assert [g.sessions for g in backends.gauges()] == [1, 1]


def test_a_failed_server_loses_its_sessions_until_it_answers_again() -> None:
    backends = Backends(("http://a", "http://b"))
    a, b = list(backends)
    assert backends.place("s").backend is a
    backends.served("s", a, "ok", 5, 0, "hello")
    backends.failed(a, "connection refused", now=1.0)
    moved = backends.place("s")
    assert moved.backend is b and moved.moved_from == "http://a"
    backends.served("s", b, "ok", 5, 0, "hello")
    first = backends.place("new")
    assert first.backend is b and first.moved_from == ""  # a first request is not a move
    backends.served("new", b, "ok", 5, 0, "hi")
    backends.answered(a)
    assert backends.place("s").backend is b  # it stays where it moved to
    assert backends.place("newer").backend is a  # back in rotation
    gauges = {g.url: g for g in backends.gauges()}
    assert gauges["http://a"].healthy and gauges["http://b"].sessions == 2


def test_with_every_server_down_the_least_recently_failed_is_tried_rather_than_none() -> None:
    backends = Backends(("http://a", "http://b"))
    a, b = list(backends)
    backends.failed(a, "down", now=5.0)
    backends.failed(b, "down", now=2.0)
    assert backends.place("s").backend is b
    assert backends.place("t", avoid=b).backend is a


def test_a_cache_claim_beyond_what_was_sent_is_flagged() -> None:
    backends = Backends(("http://a",))
    [a] = list(backends)
    assert not backends.served("s", a, " a reply", 12, 0, "<s>system: be brief\nuser: hi\n")
    # The next turn extends the first: reusing as many tokens as it shares is plausible.
    assert not backends.served("s", a, "ok", 20, 12, "<s>system: be brief\nuser: hi\n a reply\nuser: more\n")
    # An unrelated prompt shares only "<s>": a claim of 9 cached tokens cannot be true.
    assert backends.served("t", a, "x", 15, 9, "<s>something else entirely\n")
    [gauge] = backends.gauges()
    assert (gauge.requests, gauge.prompt_tokens, gauge.cached_tokens, gauge.contradicted) == (3, 47, 21, 1)


def test_the_sessions_remembered_are_bounded_least_recently_served_first_out(monkeypatch) -> None:
    from bastion.worker.remote import backends as module

    monkeypatch.setattr(module, "REMEMBERED_SESSIONS", 3)
    backends = Backends(("http://a", "http://b"))
    a, b = list(backends)
    for session in ("s1", "s2", "s3"):
        backends.served(session, a, "ok", 1, 0, session)
    backends.served("s1", a, "ok", 1, 0, "s1")  # served again: the most recent now
    backends.served("s4", b, "ok", 1, 0, "s4")  # one too many: s2, the least recent, is forgotten
    assert sum(g.sessions for g in backends.gauges()) == 3
    a.healthy = False
    assert backends.place("s2").moved_from == ""  # forgotten: placed afresh, not "moved"
    assert backends.place("s1").moved_from == "http://a"

"""`bastion sessions list|show|rm|fork`: look after the supervisor's sessions."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer

from bastion.client import render
from bastion.client.command_io import connect, expect, fail, new_id
from bastion.client.connection import ClientError
from bastion.protocol import ErrorCode
from bastion.protocol.sessions import (
    DeleteSession,
    ForkSession,
    ListSessions,
    RunStatus,
    SessionChanged,
    SessionDetail,
    SessionList,
    ShowSession,
)

sessions_app = typer.Typer(help="List, show, fork and remove sessions.", no_args_is_help=True, rich_markup_mode=None)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NameArgument = Annotated[str, typer.Argument(help="The session's name.")]


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


@sessions_app.command("list")
def list_sessions(as_json: JsonFlag = False) -> None:
    """Every session, most recently used first."""
    connection = connect(as_json, start=True)
    assert connection is not None
    with connection:
        listing = expect(connection, ListSessions(request_id=new_id()), SessionList, as_json)
    if as_json:
        render.json_line(listing)
        return
    if not listing.sessions:
        print("no sessions")
        return
    rows = [("NAME", "STATE", "MODEL", "MESSAGES", "RUNS", "LAST RUN", "UPDATED")] + [
        (s.name, s.state.value, s.model, str(s.messages), str(s.runs), s.last_run.value if s.last_run else "-", _when(s.updated_at))
        for s in listing.sessions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


@sessions_app.command("show")
def show_session(
    name: NameArgument,
    prompt: Annotated[bool, typer.Option("--prompt", help="Print the exact prompt of the next generation.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """A session's messages (or, with --prompt, the exact text the model receives next)."""
    connection = connect(as_json, start=True)
    assert connection is not None
    with connection:
        detail = expect(connection, ShowSession(request_id=new_id(), name=name, with_prompt=prompt), SessionDetail,
                        as_json)
    if as_json:
        render.json_line(detail)
        return
    if prompt:
        print(detail.prompt, end="")
        return
    summary = detail.session
    interrupted = " · last run interrupted (the supervisor stopped mid-turn)" if summary.last_run is RunStatus.INTERRUPTED else ""
    print(f"session {summary.name} · model {summary.model} · {summary.messages} messages · {summary.runs} runs"
          f"{interrupted}")
    for message in detail.messages:
        flags = "".join(
            [" [pinned]" if message.pinned else "", " [interrupted]" if message.interrupted else ""]
        )
        who = f"{message.role.value}:{message.tool_name}" if message.tool_name else message.role.value
        reasoning = f"[reasoning] {message.reasoning}\n" if message.reasoning else ""
        print(f"\n#{message.seq} {who}{flags}\n{reasoning}{message.content}")


@sessions_app.command("rm")
def remove_session(name: NameArgument) -> None:
    """Delete a session and its messages."""
    _change(DeleteSession(request_id=new_id(), name=name))


@sessions_app.command("fork")
def fork_session(name: NameArgument, new_name: Annotated[str, typer.Argument(help="The copy's name.")]) -> None:
    """Copy a session, to try another direction without losing this one."""
    _change(ForkSession(request_id=new_id(), name=name, new_name=new_name))


def _change(request: DeleteSession | ForkSession) -> None:
    connection = connect(False, start=True)
    if connection is None:
        fail(ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE, "the supervisor is not running"), False)
    with connection:
        changed = expect(connection, request, SessionChanged, False)
    render.say(f"{changed.action.value} {changed.name}")

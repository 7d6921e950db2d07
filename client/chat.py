"""`bastion chat`: an interactive multi-turn conversation in a session.

Each line you type is a run in the session (so everything `run --session`
does — tools, context pruning, the KV cache staying warm — applies). Lines
starting with `/` are commands:

    /help            this list
    /model NAME      use another model from the next message on
    /pin [TEXT]      pin TEXT as a note that is never pruned (no TEXT: pin your last message)
    /clear           forget the conversation (pins stay)
    /session         show the session's name
    /exit            leave (also Ctrl-D)

Ctrl-C while the model answers cancels that answer; at the prompt it leaves.
It reads plain lines from stdin, so it can be scripted: `printf 'hi\\n/exit\\n' | bastion chat`.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import msgspec
import typer

from bastion.client import render
from bastion.client.command_io import EXIT_CANCELLED, EXIT_OK, connect, new_id
from bastion.client.connection import ClientError, ControlConnection
from bastion.client.run_options import (
    AllowShellOption,
    AllowWriteOption,
    ContextOption,
    HideReasoningOption,
    MaxIterationsOption,
    MaxTokensOption,
    ModelOption,
    RunOptions,
    SessionOption,
    SystemOption,
    TemperatureOption,
    ToolChoiceOption,
    ToolsOption,
    WorkspaceOption,
    run_request,
)
from bastion.client.run_stream import stream_run
from bastion.protocol import RequestFailed
from bastion.protocol.agent_events import ContextStrategy
from bastion.protocol.sessions import ClearSession, PinMessage, SessionChanged
from bastion.protocol.trust import ApprovalRequired

HELP = __doc__.split("are commands:", 1)[1].split("Ctrl-C", 1)[0].rstrip()


def chat(
    session: SessionOption = None,
    model: ModelOption = None,
    system: SystemOption = None,
    tools: ToolsOption = None,
    tool_choice: ToolChoiceOption = "auto",
    max_tokens: MaxTokensOption = 512,
    temperature: TemperatureOption = None,
    max_iterations: MaxIterationsOption = 8,
    context: ContextOption = ContextStrategy.WINDOW,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the context budget per turn.")] = False,
    hide_reasoning: HideReasoningOption = False,
    workspace: WorkspaceOption = None,
    allow_shell: AllowShellOption = False,
    allow_write: AllowWriteOption = False,
) -> None:
    """Chat with a model, turn by turn, in a named session (slash commands: /help)."""
    name = session or time.strftime("chat-%Y%m%d-%H%M%S")
    options = RunOptions(model=model, system=system, session=name, tools=tools, max_tokens=max_tokens,
                         temperature=temperature, max_iterations=max_iterations, context=context,
                         workspace=workspace, allow_shell=allow_shell, allow_write=allow_write,
                         tool_choice=tool_choice)
    connection = connect(False, start=True)
    assert connection is not None
    interactive = sys.stdin.isatty()
    render.say(f"session {name}; /help for commands, /exit to leave")
    with connection:
        raise typer.Exit(_converse(connection, options, interactive=interactive, verbose=verbose,
                                   hide_reasoning=hide_reasoning))


def _converse(connection: ControlConnection, options: RunOptions, *, interactive: bool, verbose: bool,
              hide_reasoning: bool = False) -> int:
    first = True
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return EXIT_OK
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_CANCELLED
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            outcome = _command(connection, options, line)
            if outcome is not None:
                return outcome
            continue
        request = run_request(line, options)
        if not first:
            # The session remembers its system message; sending it again would restate it.
            request = msgspec.structs.replace(request, system=None)
        first = False
        code = stream_run(connection, request, as_json=False, verbose=verbose, ask=_ask_inline(interactive),
                          hide_reasoning=hide_reasoning)
        if code == EXIT_CANCELLED:
            render.say("(answer cancelled)")


def _ask_inline(interactive: bool):
    def ask(event: ApprovalRequired) -> bool:
        render.say(f"{event.tool} {event.arguments} needs approval: {event.reason}")
        try:
            answer = input("allow? [y/N] " if interactive else "")
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")

    return ask


def _command(connection: ControlConnection, options: RunOptions, line: str) -> int | None:
    """Carry out a slash command; an exit code means leave."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    match command:
        case "/exit" | "/quit":
            return EXIT_OK
        case "/help":
            print(HELP.strip("\n"), file=sys.stderr)
        case "/session":
            render.say(f"session {options.session}")
        case "/model" if argument:
            options.model = argument
            render.say(f"model {argument} from the next message on")
        case "/pin":
            _session_request(connection, PinMessage(request_id=new_id(), name=options.session or "",
                                                    text=argument or None))
        case "/clear":
            _session_request(connection, ClearSession(request_id=new_id(), name=options.session or ""))
        case _:
            render.error(f"unknown command {command}", "type /help for the list")
    return None


def _session_request(connection: ControlConnection, request: PinMessage | ClearSession) -> None:
    try:
        answer = connection.request(request)
    except ClientError as exc:
        render.error(exc.message)
        return
    match answer:
        case SessionChanged(action=action):
            render.say(f"{action.value}")
        case RequestFailed(message=message):
            render.error(message)

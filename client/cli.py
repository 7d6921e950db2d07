"""The `bastion` command: a thin client of the supervisor.

Each command is a request over the control socket; nothing here loads a model
or runs a tool. Exit codes mean something to scripts:

    0   done
    1   model or runtime error (a worker died, the supervisor is unreachable)
    2   usage error (unknown model, not a GGUF, bad flag)
    130 cancelled with Ctrl-C (the generation is cancelled in the worker too)
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, NoReturn

import msgspec
import typer

from bastion.client import render
from bastion.client.connection import ClientError, ControlConnection, supervisor_running
from bastion.client.launcher import (
    connect_running,
    ensure_supervisor,
    start_background,
    supervisor_command,
    wait_until_stopped,
)
from bastion.client.run_stream import stream_run
from bastion.protocol import ErrorCode, HomeLayout, RequestFailed, SamplingParams, Shutdown
from bastion.protocol.control import (
    GetStatus,
    ListModels,
    LoadModel,
    ModelList,
    ModelLoaded,
    ModelUnloaded,
    Run,
    StatusReport,
    UnloadModel,
)
from bastion.protocol.errors import USAGE_ERROR_CODES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

app = typer.Typer(
    name="bastion",
    help="A local-first agent runtime: GGUF models in crash-isolated workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")]


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _model_argument(model: str | None) -> str | None:
    """Paths are made absolute here: the supervisor's working directory is not ours."""
    if model is not None and ("/" in model or model.endswith(".gguf")):
        return str(Path(model).expanduser().absolute())
    return model


def _exit_for(code: ErrorCode) -> int:
    return EXIT_USAGE if code in USAGE_ERROR_CODES else EXIT_FAILURE


def _fail(error: ClientError | RequestFailed, as_json: bool) -> NoReturn:
    if as_json:
        render.json_object({"type": "error", "code": error.code.value, "message": error.message})
    else:
        render.error(error.message)
    raise typer.Exit(_exit_for(error.code))


def _connect(as_json: bool, *, start: bool) -> ControlConnection | None:
    layout = HomeLayout.from_env()
    try:
        if start:
            return ensure_supervisor(layout, render.say)
        return connect_running(layout)
    except ClientError as exc:
        _fail(exc, as_json)


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="A model name or a path to a .gguf file.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    as_json: JsonFlag = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 40,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed, for repeatable output.")] = None,
) -> None:
    """Answer PROMPT with a local model, streaming the reply."""
    connection = _connect(as_json, start=True)
    assert connection is not None
    request = Run(
        request_id=_new_id(),
        prompt=prompt,
        model=_model_argument(model),
        system=system,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
    )
    with connection:
        raise typer.Exit(stream_run(connection, request, as_json=as_json))


@app.command()
def up(
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this terminal; Ctrl-C stops it.")] = False,
) -> None:
    """Start the supervisor (in the background unless --foreground)."""
    layout = HomeLayout.from_env()
    if foreground:
        layout.ensure()
        command = supervisor_command()
        os.execv(command[0], command)
    connection = _connect(False, start=False) if supervisor_running(layout) else None
    if connection is not None:
        render.say(f"the supervisor is already running (pid {connection.supervisor_pid})")
        connection.close()
        return
    start_background(layout)
    connection = _connect(False, start=True)
    assert connection is not None
    with connection:
        render.say(f"supervisor running (pid {connection.supervisor_pid}, home {layout.root})")


@app.command()
def down(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for it to stop.")] = 30.0,
) -> None:
    """Stop the supervisor and every model worker."""
    layout = HomeLayout.from_env()
    connection = _connect(False, start=False)
    if connection is None:
        render.say("the supervisor is not running")
        return
    with connection:
        try:
            connection.request(Shutdown(request_id=_new_id()))
        except ClientError as exc:
            _fail(exc, False)
    if not wait_until_stopped(layout, timeout):
        render.error(f"the supervisor did not stop within {timeout:.0f} s", f"see {layout.supervisor_log}")
        raise typer.Exit(EXIT_FAILURE)
    render.say("supervisor stopped")


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Is the supervisor running, and what is it doing? Exit code 1 when it is not running."""
    layout = HomeLayout.from_env()
    connection = _connect(as_json, start=False)
    if connection is None:
        if as_json:
            render.json_object({"type": "status", "running": False, "home": str(layout.root)})
        else:
            print(f"supervisor: not running (home {layout.root})")
        raise typer.Exit(EXIT_FAILURE)
    with connection:
        report = _expect(connection, GetStatus(request_id=_new_id()), StatusReport, as_json)
    if as_json:
        render.json_object({"running": True, **_as_dict(report)})
        return
    print(f"supervisor: running (pid {report.pid}, up {report.uptime_s:.0f} s, bastion {report.version})")
    print(f"home:       {report.home}")
    print(f"socket:     {report.control_endpoint}")
    print(f"models:     {report.models_loaded} loaded, {report.runs_active} runs active")


@app.command()
def ps(as_json: JsonFlag = False) -> None:
    """List loaded models with their worker process, memory and KV cache."""
    connection = _connect(as_json, start=False)
    if connection is None:
        if as_json:
            render.json_object({"type": "models", "models": []})
        else:
            print("no models loaded (the supervisor is not running)")
        return
    with connection:
        listing = _expect(connection, ListModels(request_id=_new_id()), ModelList, as_json)
    if as_json:
        render.json_line(listing)
    else:
        print(render.model_table(listing.models))


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="A model name or a path to a .gguf file.")],
    as_json: JsonFlag = False,
) -> None:
    """Load a model into its own worker process (no-op if it is loaded)."""
    connection = _connect(as_json, start=True)
    assert connection is not None
    request = LoadModel(request_id=_new_id(), model=_model_argument(model) or model)
    renderer = render.TextRenderer()
    with connection:
        connection.send(request)
        try:
            for event in connection.events(request.request_id):
                if as_json:
                    render.json_line(event)
                match event:
                    case ModelLoaded():
                        renderer.finish()
                        if not as_json:
                            state = "already loaded" if event.already_loaded else "loaded"
                            render.say(f"{event.model.name} {state} (worker pid {event.model.pid})")
                        return
                    case RequestFailed():
                        renderer.finish()
                        _fail(event, as_json) if not as_json else _exit_quietly(event)
                    case _:
                        if not as_json:
                            renderer(event)
        except ClientError as exc:
            _fail(exc, as_json)


@app.command()
def unload(
    model: Annotated[str, typer.Argument(help="The name of a loaded model.")],
    as_json: JsonFlag = False,
) -> None:
    """Stop a model's worker process and free its memory."""
    connection = _connect(as_json, start=False)
    if connection is None:
        _fail(ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE, "the supervisor is not running"), as_json)
    with connection:
        done = _expect(connection, UnloadModel(request_id=_new_id(), model=model), ModelUnloaded, as_json)
    if as_json:
        render.json_line(done)
    else:
        render.say(f"unloaded {done.name}")


def _expect(connection: ControlConnection, request, expected: type, as_json: bool):
    try:
        event = connection.request(request)
    except ClientError as exc:
        _fail(exc, as_json)
    if isinstance(event, RequestFailed):
        _fail(event, as_json)
    if not isinstance(event, expected):
        _fail(ClientError(ErrorCode.INTERNAL, f"unexpected answer {type(event).__name__}"), as_json)
    return event


def _exit_quietly(event: RequestFailed) -> NoReturn:
    raise typer.Exit(_exit_for(event.code))


def _as_dict(struct: msgspec.Struct) -> dict:
    return msgspec.to_builtins(struct)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_CANCELLED)

"""The `bastion` command: a thin client of the supervisor.

Each command is a request over the control socket; nothing here loads a model
or runs a tool. Exit codes mean something to scripts:

    0   done
    1   model or runtime error (a worker died, the supervisor is unreachable,
        an agent run stopped at its iteration or repair limit)
    2   usage error (unknown model or session, not a GGUF, bad flag, bad config)
    130 cancelled with Ctrl-C (the generation is cancelled in the worker too)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import msgspec
import typer

from bastion.client import memory_text, render
from bastion.client.chat import chat
from bastion.client.command_io import (
    EXIT_CANCELLED,
    EXIT_FAILURE,
    connect,
    exit_for,
    expect,
    fail,
    model_argument,
    new_id,
)
from bastion.client.connection import ClientError
from bastion.client.launcher import (
    gateway_command,
    gateway_pid,
    start_gateway,
    stop_gateway,
    supervisor_command,
    wait_until_stopped,
)
from bastion.client.models_cli import models_app
from bastion.client.run_options import (
    AllowShellOption,
    AllowWriteOption,
    ApprovalTimeoutOption,
    ContextOption,
    HideReasoningOption,
    IgnoreEosOption,
    KeepAliveOption,
    LoopGuardOption,
    MaxIterationsOption,
    MaxTokensOption,
    MinPOption,
    ModelOption,
    RepeatPenaltyOption,
    RunOptions,
    SeedOption,
    SessionOption,
    SystemOption,
    TemperatureOption,
    TemplateOption,
    ToolChoiceOption,
    ToolsOption,
    TopKOption,
    TopPOption,
    WorkspaceOption,
    keep_alive_seconds,
    run_request,
)
from bastion.client.run_stream import stream_run
from bastion.client.sessions_cli import sessions_app
from bastion.client.trust_cli import approvals, approve, audit_app, deny, doctor, policy_app, tools_app
from bastion.protocol import ErrorCode, HomeLayout, RequestFailed, Shutdown
from bastion.protocol.agent_events import ContextStrategy
from bastion.protocol.control import (
    GetStatus,
    ListModels,
    LoadModel,
    ModelList,
    ModelLoaded,
    ModelUnloaded,
    StatusReport,
    UnloadModel,
)
from bastion.protocol.home import supervisor_running
from bastion.protocol.network import DEFAULT_HTTP_PORT, is_loopback, split_address

app = typer.Typer(
    name="bastion",
    # Plain help and usage errors: rendering them with rich costs ~70 ms a call.
    rich_markup_mode=None,
    help="A local-first agent runtime: GGUF models in crash-isolated workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(sessions_app, name="sessions")
app.add_typer(tools_app, name="tools")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.command()(chat)
app.command()(approvals)
app.command()(approve)
app.command()(deny)
app.command()(doctor)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")]


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: ModelOption = None,
    system: SystemOption = None,
    session: SessionOption = None,
    tools: ToolsOption = None,
    tool_choice: ToolChoiceOption = "auto",
    template: TemplateOption = None,
    as_json: JsonFlag = False,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    min_p: MinPOption = None,
    repeat_penalty: RepeatPenaltyOption = None,
    seed: SeedOption = None,
    loop_guard: LoopGuardOption = True,
    hide_reasoning: HideReasoningOption = False,
    max_iterations: MaxIterationsOption = 8,
    context: ContextOption = ContextStrategy.WINDOW,
    show_prompt: Annotated[
        bool, typer.Option("--show-prompt", help="Print the exact prompt the model would receive; generate nothing.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show the context budget per turn.")] = False,
    ignore_eos: IgnoreEosOption = False,
    workspace: WorkspaceOption = None,
    allow_shell: AllowShellOption = False,
    allow_write: AllowWriteOption = False,
    approval_timeout: ApprovalTimeoutOption = 300.0,
    keep_alive: KeepAliveOption = None,
) -> None:
    """Answer PROMPT with a local model, streaming the reply (an agent run when --tools are given)."""
    options = RunOptions(model=model, system=system, session=session, tools=tools, template=template,
                         max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                         repeat_penalty=repeat_penalty, loop_guard=loop_guard, seed=seed,
                         max_iterations=max_iterations, context=context, ignore_eos=ignore_eos,
                         workspace=workspace, allow_shell=allow_shell, allow_write=allow_write,
                         approval_timeout=approval_timeout, keep_alive=keep_alive, tool_choice=tool_choice)
    connection = connect(as_json, start=True)
    assert connection is not None
    with connection:
        code = stream_run(connection, run_request(prompt, options, show_prompt=show_prompt), as_json=as_json,
                          hide_reasoning=hide_reasoning, verbose=verbose)
    raise typer.Exit(code)


HttpOption = Annotated[
    str | None,
    typer.Option("--http", metavar="[HOST:]PORT",
                 help="Also serve the OpenAI- and Ollama-compatible HTTP APIs (loopback unless HOST says otherwise)."),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="BASTION_API_KEY", show_envvar=True,
                 help="Require `Authorization: Bearer KEY` on the HTTP APIs (needed off loopback)."),
]
ApiKeyFileOption = Annotated[str | None, typer.Option("--api-key-file", help="Read the API key from this file.")]
CorsOption = Annotated[
    list[str] | None, typer.Option("--cors-origin", help="Let browser pages from this origin call the APIs.")
]


def _http_address(value: str) -> tuple[str, int]:
    try:
        return split_address(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--http") from exc


def _read_key(api_key: str | None, api_key_file: str | None) -> str | None:
    if api_key_file:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {api_key_file}: {exc}", param_hint="--api-key-file") from exc
        if not key:
            raise typer.BadParameter(f"{api_key_file} is empty", param_hint="--api-key-file")
        return key
    return api_key


def _refuse_open_without_key(host: str, key: str | None) -> None:
    if key is None and not is_loopback(host):
        render.error(f"refusing to serve {host} without an API key",
                     "pass --api-key or --api-key-file, or serve 127.0.0.1")
        raise typer.Exit(2)


AgentRunsOption = Annotated[
    bool,
    typer.Option("--agent-runs",
                 help="Also serve bastion's agent runs (its tools, workspaces, approvals) and sessions over HTTP."),
]


@app.command()
def up(
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this terminal; Ctrl-C stops it.")] = False,
    http: HttpOption = None,
    api_key: ApiKeyOption = None,
    api_key_file: ApiKeyFileOption = None,
    cors_origin: CorsOption = None,
    agent_runs: AgentRunsOption = False,
) -> None:
    """Start the supervisor (in the background unless --foreground), and with --http the HTTP gateway."""
    layout = HomeLayout.from_env()
    address = _http_address(http) if http else None
    key = _read_key(api_key, api_key_file)
    if address is not None:
        _refuse_open_without_key(address[0], key)
    if foreground:
        if address is not None:
            render.error("--foreground runs the supervisor alone", "use `bastion serve` for the gateway in a terminal")
            raise typer.Exit(2)
        layout.ensure()
        command = supervisor_command()
        os.execv(command[0], command)
    if supervisor_running(layout):
        connection = connect(False, start=False)
        if connection is not None:
            render.say(f"the supervisor is already running (pid {connection.supervisor_pid})")
            connection.close()
    if not supervisor_running(layout):
        connection = connect(False, start=True)
        assert connection is not None
        with connection:
            render.say(f"supervisor running (pid {connection.supervisor_pid}, home {layout.root})")
    if address is None:
        return
    running = gateway_pid(layout)
    if running:
        render.say(f"the HTTP gateway is already running (pid {running}); `bastion down` stops it")
        return
    try:
        pid = start_gateway(layout, *address, api_key=key, cors_origins=tuple(cors_origin or ()),
                            agent_runs=agent_runs)
    except ClientError as exc:
        fail(exc, False)
    host, port = address
    render.say(f"HTTP gateway on http://{host}:{port} (pid {pid}, log {layout.gateway_log}): "
               f"OpenAI at /v1, Ollama at /api")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = DEFAULT_HTTP_PORT,
    api_key: ApiKeyOption = None,
    api_key_file: ApiKeyFileOption = None,
    cors_origin: CorsOption = None,
    agent_runs: AgentRunsOption = False,
) -> None:
    """Serve the OpenAI- and Ollama-compatible HTTP APIs in this terminal (starts the supervisor if needed)."""
    key = _read_key(api_key, api_key_file)
    _refuse_open_without_key(host, key)
    connection = connect(False, start=True)
    assert connection is not None
    connection.close()
    layout = HomeLayout.from_env()
    running = gateway_pid(layout)
    if running:
        render.error(f"a gateway already serves this home (pid {running})", "`bastion down` stops it")
        raise typer.Exit(EXIT_FAILURE)
    if key:
        os.environ["BASTION_API_KEY"] = key
    command = gateway_command(host, port, pid_file=str(layout.gateway_pid_file),
                              cors_origins=tuple(cors_origin or ()), agent_runs=agent_runs)
    os.execv(command[0], command)


@app.command()
def down(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for it to stop.")] = 30.0,
) -> None:
    """Stop the HTTP gateway (from `up --http` or `serve`), the supervisor and every model worker."""
    layout = HomeLayout.from_env()
    if not stop_gateway(layout, timeout):
        render.error(f"the HTTP gateway did not stop within {timeout:.0f} s", f"see {layout.gateway_log}")
        raise typer.Exit(EXIT_FAILURE)
    connection = connect(False, start=False)
    if connection is None:
        render.say("the supervisor is not running")
        return
    with connection:
        pid = connection.supervisor_pid
        try:
            connection.request(Shutdown(request_id=new_id()))
        except ClientError as exc:
            fail(exc, False)
    if not wait_until_stopped(layout, timeout, pid):
        render.error(f"the supervisor did not stop within {timeout:.0f} s", f"see {layout.supervisor_log}")
        raise typer.Exit(EXIT_FAILURE)
    render.say("supervisor stopped")


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Is the supervisor running, and what is it doing? Exit code 1 when it is not running."""
    layout = HomeLayout.from_env()
    connection = connect(as_json, start=False)
    if connection is None:
        if as_json:
            render.json_object({"type": "status", "running": False, "home": str(layout.root)})
        else:
            print(f"supervisor: not running (home {layout.root})")
        raise typer.Exit(EXIT_FAILURE)
    with connection:
        report = expect(connection, GetStatus(request_id=new_id()), StatusReport, as_json)
    if as_json:
        render.json_object({"running": True, **_as_dict(report)})
        return
    print(f"supervisor: running (pid {report.pid}, up {report.uptime_s:.0f} s, bastion {report.version})")
    print(f"home:       {report.home}")
    print(f"socket:     {report.control_endpoint}")
    print(f"models:     {report.models_loaded} loaded, {report.runs_active} runs active")
    for i, line in enumerate(memory_text.budget_lines(report)):
        print(f"{'memory:' if i == 0 else '':<12}{line}")


@app.command()
def ps(as_json: JsonFlag = False) -> None:
    """List loaded models: worker process, state, memory, KV cache; restarting and failed ones say why."""
    connection = connect(as_json, start=False)
    if connection is None:
        if as_json:
            render.json_object({"type": "models", "models": []})
        else:
            print("no models loaded (the supervisor is not running)")
        return
    with connection:
        listing = expect(connection, ListModels(request_id=new_id()), ModelList, as_json)
    if as_json:
        render.json_line(listing)
    else:
        print(render.model_table(listing.models))


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="A model name or a path to a .gguf file.")],
    as_json: JsonFlag = False,
    keep_alive: KeepAliveOption = None,
) -> None:
    """Load a model into its own worker process (no-op if it is loaded with the same settings)."""
    request = LoadModel(request_id=new_id(), model=model_argument(model) or model,
                        keep_alive_s=keep_alive_seconds(keep_alive))
    connection = connect(as_json, start=True)
    assert connection is not None
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
                            if event.reload_reason:
                                state = f"reloaded with new settings ({event.reload_reason})"
                            render.say(f"{event.model.name} {state} (worker pid {event.model.pid}, "
                                       f"~{memory_text.memory_cell(event.model)}, keep_alive "
                                       f"{memory_text.keep_alive_cell(event.model)})")
                        return
                    case RequestFailed():
                        renderer.finish()
                        fail(event, as_json) if not as_json else _exit_quietly(event)
                    case _:
                        if not as_json:
                            renderer(event)
        except ClientError as exc:
            fail(exc, as_json)


@app.command()
def unload(
    model: Annotated[str, typer.Argument(help="The name of a loaded model.")],
    as_json: JsonFlag = False,
) -> None:
    """Stop a model's worker process and free its memory."""
    connection = connect(as_json, start=False)
    if connection is None:
        fail(ClientError(ErrorCode.SUPERVISOR_UNAVAILABLE, "the supervisor is not running"), as_json)
    with connection:
        done = expect(connection, UnloadModel(request_id=new_id(), model=model), ModelUnloaded, as_json)
    if as_json:
        render.json_line(done)
    else:
        render.say(f"unloaded {done.name}")


def _exit_quietly(event: RequestFailed) -> NoReturn:
    raise typer.Exit(exit_for(event.code))


def _as_dict(struct: msgspec.Struct) -> dict:
    return msgspec.to_builtins(struct)


def main() -> None:
    try:
        _app_for(sys.argv[1:])()
    except KeyboardInterrupt:
        sys.exit(EXIT_CANCELLED)


def _app_for(args: list[str]) -> typer.Typer:
    """What to run: for `bastion COMMAND …`, an app holding that one command; for anything else
    (help, a group such as `sessions`, an unknown name) the whole app. Typer builds every
    command's parameters before it runs one, 18 ms of each call for 44 commands."""
    if not args or args[0].startswith("-"):
        return app
    for info in app.registered_commands:
        callback = info.callback
        if callback is not None and (info.name or typer.main.get_command_name(callback.__name__)) == args[0]:
            one = typer.Typer(name=app.info.name, rich_markup_mode=None, help=app.info.help, no_args_is_help=True,
                              add_completion=False, pretty_exceptions_enable=False)
            one.registered_commands = [info]
            # A group, as the whole app is: a lone command would take its own name for an argument.
            one.callback()(lambda: None)
            return one
    return app

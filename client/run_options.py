"""The options `bastion run` and `bastion chat` share, and the `Run` they build."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import typer

from bastion.client.command_io import model_argument, new_id
from bastion.protocol.agent_events import ContextStrategy
from bastion.protocol.control import Run, SamplingRequest, ToolChoice, ToolChoiceMode
from bastion.protocol.quantities import parse_duration

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="A model name, a path to a .gguf file, or scripted:FILE (canned replies)."),
]
SystemOption = Annotated[str | None, typer.Option("--system", help="A system message (kept by a session).")]
SessionOption = Annotated[
    str | None, typer.Option("--session", "-s", help="Continue (or start) this named session.")
]
ToolsOption = Annotated[
    str | None,
    typer.Option("--tools", help="Comma-separated tools the model may call, e.g. clock,calculator."),
]
ToolChoiceOption = Annotated[
    str,
    typer.Option(
        "--tool-choice",
        help="auto: the model may call a tool (a call it starts is held to the tool's schema); required: its "
        "first reply is a tool call; none: offer no tools; or a tool's name: its first reply calls that tool.",
    ),
]
TemplateOption = Annotated[
    str | None, typer.Option("--template", help="Use this built-in chat template instead of the model's own.")
]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", min=1, help="Stop a reply after this many tokens.")]
_RECOMMENDED = "Default: the model's recommendation (its GGUF, else its family's published one)."
TemperatureOption = Annotated[
    float | None, typer.Option("--temperature", min=0.0, help=f"0 is greedy. {_RECOMMENDED}")
]
TopPOption = Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help=_RECOMMENDED)]
TopKOption = Annotated[int | None, typer.Option("--top-k", min=0, help=_RECOMMENDED)]
MinPOption = Annotated[float | None, typer.Option("--min-p", min=0.0, max=1.0, help=_RECOMMENDED)]
RepeatPenaltyOption = Annotated[float | None, typer.Option("--repeat-penalty", min=0.0, help=_RECOMMENDED)]
HideReasoningOption = Annotated[
    bool, typer.Option("--hide-reasoning", help="Do not show the model's reasoning (it is still kept apart).")
]
LoopGuardOption = Annotated[
    bool,
    typer.Option("--loop-guard/--no-loop-guard",
                 help="Stop a reply that keeps repeating the same span (stop reason `repetition`)."),
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Sampling seed, for repeatable output.")]
MaxIterationsOption = Annotated[
    int, typer.Option("--max-iterations", min=1, help="Most model calls in one agent run (tool use).")
]
ContextOption = Annotated[
    ContextStrategy,
    typer.Option("--context", help="When the conversation outgrows the context: drop or summarise old turns."),
]


WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="The directory file and shell tools act in (default: here)."),
]
AllowShellOption = Annotated[bool, typer.Option("--allow-shell", help="Offer the model the shell tool.")]
AllowWriteOption = Annotated[
    bool, typer.Option("--allow-write", help="Let tools write files in the workspace (write_file, edit_file).")
]
ApprovalTimeoutOption = Annotated[
    float, typer.Option("--approval-timeout", min=1, help="Seconds an approval waits before it counts as deny.")
]


def keep_alive_seconds(value: str | None) -> float | None:
    """`--keep-alive` as seconds (-1: never); None when not given."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keep-alive") from None


KeepAliveOption = Annotated[
    str | None,
    typer.Option(
        "--keep-alive",
        help='Keep the model loaded this long once idle: "5m", "30s", 0 (unload when done), -1 (never). '
        "Default: the model's keep_alive setting (5m unless configured).",
    ),
]
IgnoreEosOption = Annotated[
    bool, typer.Option("--ignore-eos", help="Generate exactly --max-tokens, past end-of-text (benchmarks).")
]


class RunOptions(msgspec.Struct, kw_only=True):
    model: str | None = None
    system: str | None = None
    session: str | None = None
    tools: str | None = None
    template: str | None = None
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    loop_guard: bool = True
    seed: int | None = None
    max_iterations: int = 8
    context: ContextStrategy = ContextStrategy.WINDOW
    ignore_eos: bool = False
    workspace: Path | None = None
    allow_shell: bool = False
    allow_write: bool = False
    approval_timeout: float = 300.0
    keep_alive: str | None = None
    tool_choice: str = "auto"


def tool_choice(value: str) -> ToolChoice:
    """`--tool-choice` as the request carries it: a mode, or any other word as a tool's name."""
    try:
        mode = ToolChoiceMode(value.strip().lower())
    except ValueError:
        return ToolChoice(mode=ToolChoiceMode.FUNCTION, name=value.strip())
    if mode is ToolChoiceMode.FUNCTION:
        raise typer.BadParameter("name the tool itself, e.g. --tool-choice calculator", param_hint="--tool-choice")
    return ToolChoice(mode=mode)


def tool_names(tools: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (tools or "").split(",") if name.strip())


def run_request(prompt: str, options: RunOptions, *, show_prompt: bool = False) -> Run:
    return Run(
        request_id=new_id(),
        prompt=prompt,
        model=model_argument(options.model),
        system=options.system,
        sampling=SamplingRequest(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            repeat_penalty=options.repeat_penalty,
            seed=options.seed,
            ignore_eos=options.ignore_eos,
            loop_guard=options.loop_guard,
        ),
        session=options.session,
        tools=tool_names(options.tools),
        template=options.template,
        max_iterations=options.max_iterations,
        context_strategy=options.context,
        show_prompt=show_prompt,
        workspace=str((options.workspace or Path.cwd()).expanduser().absolute()),
        allow_shell=options.allow_shell,
        allow_write=options.allow_write,
        approval_timeout_s=options.approval_timeout,
        tool_choice=tool_choice(options.tool_choice),
        keep_alive_s=keep_alive_seconds(options.keep_alive),
    )

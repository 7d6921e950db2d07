"""The policy as data: rules, where each came from, and what a decision says.

Owns `PolicySpec` (what `loader.py` builds from files), `Rule`, `ProtectedPath`,
`Source`, the call type for tools outside the sandbox (`NamedToolCall`) and the
decision types `engine.py` returns. Nothing here reads files or decides.
"""

from __future__ import annotations

import msgspec

from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.sandbox_wire import SandboxedArgs
from bastion.supervisor.trust.policy.patterns import CommandPattern, PathPattern


class Source(msgspec.Struct, frozen=True, kw_only=True):
    """Where something in the effective policy was written."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """Matches calls to any tool named by `tools`; `commands` narrows it to those shell
    commands, `paths` to those workspace paths (a rule has at most one of the two)."""

    decision: ToolDecisionKind
    tools: tuple[str, ...]
    commands: tuple[CommandPattern, ...] = ()
    paths: tuple[PathPattern, ...] = ()
    note: str = ""  # why the rule exists, shown with decisions it makes
    source: Source


class ProtectedPath(msgspec.Struct, frozen=True, kw_only=True):
    pattern: PathPattern
    # The segments a rule's pattern must spell out to name this path (`.git`, `hooks`).
    core: tuple[str, ...]
    source: Source | None = None  # None: built in
    label: str = ""  # e.g. "bastion home", shown by describe()


class PolicySpec(msgspec.Struct, frozen=True, kw_only=True):
    default: ToolDecisionKind
    default_source: Source | None  # None: no file set one, so the built-in `ask`
    rules: tuple[Rule, ...]
    protected: tuple[ProtectedPath, ...]  # from the files' `protected` keys (built-ins are the engine's)
    files: tuple[str, ...]  # every file loaded, the root first


class NamedToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call to a tool that does not run in the sandbox (`clock`, `calculator`, later MCP
    tools): the policy decides it by name alone, since it has no paths or commands."""

    name: str


PolicyCall = SandboxedArgs | NamedToolCall


class PartDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The decision about one thing a call does: a simple command, a path, a redirection."""

    subject: str
    decision: ToolDecisionKind
    reason: str
    rule: str | None = None  # file:line of the deciding rule; None for the default or a built-in check


class PolicyDecision(msgspec.Struct, frozen=True, kw_only=True):
    decision: ToolDecisionKind
    reason: str
    rule: str | None = None  # file:line of the deciding rule; None for the default or a built-in check
    parts: tuple[PartDecision, ...] = ()  # what was weighed, in order; the strictest one decided

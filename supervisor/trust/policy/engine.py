"""Deciding one tool call: allow, deny or ask, with the reason and the rule that decided.

Owns `Policy`: the semantics of a `PolicySpec`.

- Every rule that matches counts; deny beats ask beats allow; when none
  matches, the policy's default decides.
- A shell command is split into the simple commands it would run
  (`shell_words.py`); each is decided alone and the strictest wins, so it is
  allowed only when every part is. A part nothing matches, or one that cannot be
  analysed, is at least `ask`, whatever the default: a compound command is never
  allowed by default. A part with words only known at run time (`$X`, `$(…)`,
  xargs' input) or with assignments in its environment is never allowed either.
- Redirection targets are decided as `write_file`/`read_file` calls on those paths.
- Paths are placed in the workspace (`workspace_paths.py`): outside it is deny.
  Protected paths (`.git/hooks`, `.git/config`, the policy's own files, the
  files given to the constructor, and the files' `protected` lists) are denied
  unless a matching rule spells them out (`.git/hooks/*` does, `**` does not).

It reads no files of the workspace, except to follow symlinks for `place`.
"""

from __future__ import annotations

import functools
import hashlib
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from bastion.protocol import HomeLayout
from bastion.protocol.agent_events import ToolDecisionKind
from bastion.protocol.sandbox_wire import (
    EditFileArgs,
    GlobArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    ShellArgs,
    WriteFileArgs,
    tool_name,
)
from bastion.supervisor.trust.policy.describe import describe_policy
from bastion.supervisor.trust.policy.loader import bundled_path, load_policy
from bastion.supervisor.trust.policy.model import (
    NamedToolCall,
    PartDecision,
    PolicyCall,
    PolicyDecision,
    PolicySpec,
    ProtectedPath,
    Rule,
)
from bastion.supervisor.trust.policy.patterns import PathPattern, is_magic, tool_matches
from bastion.supervisor.trust.policy.shell_facts import Redirection, RedirectKind, SimpleCommand
from bastion.supervisor.trust.policy.shell_words import parse_command
from bastion.supervisor.trust.policy.workspace_paths import display, place

ALLOW, ASK, DENY = ToolDecisionKind.ALLOW, ToolDecisionKind.ASK, ToolDecisionKind.DENY
_RANK = {ALLOW: 0, ASK: 1, DENY: 2}
BUILTIN_PROTECTED = ("**/.git/hooks/**", "**/.git/config")
# Redirections to these touch no file of anyone's.
_HARMLESS_TARGETS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/stdin", "/dev/fd/0", "/dev/fd/1",
                               "/dev/fd/2"})


def strictest(decisions: Iterable[ToolDecisionKind]) -> ToolDecisionKind:
    return max(decisions, key=_RANK.__getitem__, default=ALLOW)


class Policy:
    def __init__(self, spec: PolicySpec, *, protected_files: Sequence[Path] = ()) -> None:
        """`protected_files`: absolute paths (bastion's own config and policy) no tool may touch
        unless a rule names them, should a workspace ever contain them."""
        self.spec = spec
        self.protected_files = tuple(Path(p).absolute() for p in protected_files)
        builtin = [PathPattern.parse(text) for text in BUILTIN_PROTECTED]
        self._protected = (
            *(ProtectedPath(pattern=p, core=p.literal_segments, label="built in") for p in builtin),
            *spec.protected,
        )

    @classmethod
    def load(cls, path: Path | None = None, *, protected_files: Sequence[Path] = ()) -> Policy:
        """The policy in `path` (None: the bundled default)."""
        return cls(load_policy(path or bundled_path()), protected_files=protected_files)

    @classmethod
    def for_home(cls, layout: HomeLayout) -> Policy:
        """The home's `policy.toml` if it exists, else the bundled default; the home's
        config and policy files are protected either way."""
        path = layout.policy_file if layout.policy_file.exists() else None
        return cls.load(path, protected_files=(layout.config_file, layout.policy_file))

    @property
    def source(self) -> Path:
        """The file this policy was loaded from (the files it includes follow it in `spec.files`)."""
        return Path(self.spec.files[0])

    @functools.cached_property
    def hash(self) -> str:
        """A digest (computed once: a Policy never changes) of what decides: rules, default, protected paths (not lines, notes or comments)."""
        view = {
            "default": self.spec.default.value,
            "rules": [[r.decision.value, list(r.tools), [c.text for c in r.commands], [p.text for p in r.paths]]
                      for r in self.spec.rules],
            "protected": [p.pattern.text for p in self._protected],
            "protected_files": [str(p) for p in self.protected_files],
        }
        return "sha256:" + hashlib.sha256(msgspec.json.encode(view)).hexdigest()

    def describe(self) -> str:
        """The effective policy, each rule with the file and line it came from."""
        return describe_policy(self.spec, self._protected, self._own_files(), self.hash)

    def decide(self, call: PolicyCall, *, workspace: Path) -> PolicyDecision:
        match call:
            case NamedToolCall(name=name):
                return _single(self._by_name(name))
            case ShellArgs(command=command):
                return self._shell(command, workspace)
            case GlobArgs(pattern=pattern):
                return _single(self._glob(pattern, workspace))
            case ReadFileArgs(path=path) | WriteFileArgs(path=path) | EditFileArgs(path=path) | ListDirArgs(
                path=path
            ) | GrepArgs(path=path):
                tool = tool_name(call)
                return _single(self._path(tool, path, workspace, subject=f"{tool} {path}"))
        raise TypeError(f"no policy for a {type(call).__name__}")

    # --- subjects ---------------------------------------------------------------

    def _by_name(self, tool: str) -> PartDecision:
        matching = [r for r in self.spec.rules if tool_matches(r.tools, tool) and not r.commands and not r.paths]
        return self._judge(tool, matching) or self._default(tool)

    def _shell(self, command: str, workspace: Path) -> PolicyDecision:
        parsed = parse_command(command)
        parts = [PartDecision(subject=o.detail, decision=self._at_least_ask(),
                              reason=f"cannot be analysed ({o.reason.value}): {o.detail}") for o in parsed.opaque]
        parts += [self._command(c) for c in parsed.commands]
        for redirection in parsed.redirections:
            part = self._redirection(redirection, parsed.changes_directory, workspace)
            if part is not None:
                parts.append(part)
        if not parts:
            parts.append(PartDecision(subject=command, decision=self._at_least_ask(), reason="no command to run"))
        decision = strictest(p.decision for p in parts)
        if decision is ALLOW:
            reason = "allowed: " + "; ".join(f"{p.subject} ({p.rule or 'default'})" for p in parts)
            return PolicyDecision(decision=ALLOW, reason=reason, rule=parts[0].rule, parts=tuple(parts))
        deciding = next(p for p in parts if p.decision is decision)
        return PolicyDecision(decision=decision, reason=deciding.reason, rule=deciding.rule, parts=tuple(parts))

    def _command(self, command: SimpleCommand) -> PartDecision:
        if not command.argv:
            subject = " ".join(command.assignments)
            return PartDecision(subject=subject, decision=self._at_least_ask(),
                                reason=f"{subject}: sets shell variables, which change what later commands do")
        subject = shlex.join(command.argv)
        matching = [r for r in self.spec.rules if tool_matches(r.tools, "shell") and not r.paths
                    and (not r.commands or any(p.matches(command.argv, by_basename=r.decision is not ALLOW)
                                               for p in r.commands))]
        verdict = self._judge(subject, matching)
        if verdict is None:
            return PartDecision(subject=subject, decision=self._at_least_ask(), reason=f"{subject}: matches no rule")
        if verdict.decision is ALLOW and command.runtime_words:
            words = ", ".join(command.runtime_words)
            return msgspec.structs.replace(verdict, decision=ASK,
                                           reason=f"{subject}: {words} only known when it runs")
        if verdict.decision is ALLOW and command.assignments:
            names = ", ".join(command.assignments)
            return msgspec.structs.replace(verdict, decision=ASK, reason=f"{subject}: runs with {names} set")
        return verdict

    def _redirection(self, redirection: Redirection, after_cd: bool, workspace: Path) -> PartDecision | None:
        target = redirection.target
        if target in _HARMLESS_TARGETS and not redirection.runtime:
            return None
        verb = "writes" if redirection.kind is RedirectKind.WRITE else "reads"
        subject = f"{verb} {target}"
        if redirection.from_home:
            return PartDecision(subject=subject, decision=DENY,
                                reason=f"{subject}: under the home directory, outside the workspace")
        if redirection.runtime:
            return PartDecision(subject=subject, decision=self._at_least_ask(),
                                reason=f"{subject}: the file is only known when it runs")
        tool = "write_file" if redirection.kind is RedirectKind.WRITE else "read_file"
        verdict = self._path(tool, target, workspace, subject=subject)
        if verdict.decision is ALLOW and after_cd and not target.startswith("/"):
            return msgspec.structs.replace(verdict, decision=ASK,
                                           reason=f"{subject}: after a cd, a relative path may be elsewhere")
        return verdict

    def _glob(self, pattern: str, workspace: Path) -> PartDecision:
        segments = pattern.split("/")
        fixed = 0
        while fixed < len(segments) and not is_magic(segments[fixed]):
            fixed += 1
        subject = f"glob {pattern}"
        if ".." in segments[fixed:]:
            return PartDecision(subject=subject, decision=DENY,
                                reason=f"{subject}: '..' after a wildcard can leave the workspace")
        base = "/".join(segments[:fixed]) or ("/" if pattern.startswith("/") else ".")
        return self._path("glob", base, workspace, subject=subject)

    def _path(self, tool: str, path: str, workspace: Path, *, subject: str) -> PartDecision:
        placement = place(path, workspace)
        if placement.outside is not None:
            return PartDecision(subject=subject, decision=DENY, reason=placement.outside)
        verdicts = [self._place(tool, segments, workspace, subject) for segments in placement.readings]
        decision = strictest(v.decision for v in verdicts)
        return next(v for v in verdicts if v.decision is decision)

    def _place(self, tool: str, segments: tuple[str, ...], workspace: Path, subject: str) -> PartDecision:
        matching = [r for r in self.spec.rules if tool_matches(r.tools, tool) and not r.commands
                    and (not r.paths or any(p.matches(segments) for p in r.paths))]
        for protected in self._protected_here(workspace):
            if protected.pattern.matches(segments, fold_case=True) and not any(
                _names(rule, protected, segments) for rule in matching
            ):
                origin = protected.label or str(protected.source)
                return PartDecision(subject=subject, decision=DENY,
                                    reason=f"{display(segments)} is protected ({protected.pattern.text}, "
                                           f"{origin}); only a rule naming it can allow it")
        return self._judge(subject, matching) or self._default(subject)

    def _protected_here(self, workspace: Path) -> list[ProtectedPath]:
        """Protected patterns, plus the protected files and policy files that lie in this workspace."""
        entries = list(self._protected)
        for file in self._own_files():
            placement = place(str(file.absolute()), workspace)
            for segments in placement.readings:
                entries.append(ProtectedPath(pattern=PathPattern.literal(segments), core=segments,
                                             label=f"bastion's own file {file}"))
        return entries

    def _own_files(self) -> list[Path]:
        """bastion's files given to the constructor and the policy's own files, except those
        shipped with bastion (its source tree may well be the workspace)."""
        bundled = bundled_path().parent
        loaded = [Path(f).absolute() for f in self.spec.files if Path(f).absolute().parent != bundled]
        return list(dict.fromkeys([*self.protected_files, *loaded]))

    # --- verdicts ---------------------------------------------------------------

    def _judge(self, subject: str, matching: Sequence[Rule]) -> PartDecision | None:
        if not matching:
            return None
        decision = strictest(r.decision for r in matching)
        rule = next(r for r in matching if r.decision is decision)
        note = f" ({rule.note})" if rule.note else ""
        return PartDecision(subject=subject, decision=decision,
                            reason=f"{subject}: {decision.value} by the rule at {rule.source}{note}",
                            rule=str(rule.source))

    def _default(self, subject: str) -> PartDecision:
        return PartDecision(subject=subject, decision=self.spec.default,
                            reason=f"{subject}: no rule matches; the default is {self.spec.default.value}")

    def _at_least_ask(self) -> ToolDecisionKind:
        return strictest((ASK, self.spec.default))


def _names(rule: Rule, protected: ProtectedPath, segments: tuple[str, ...]) -> bool:
    """Whether `rule` names this protected path itself: one of its patterns matches it and
    spells out the protected segments (`.git/hooks/pre-commit`, not `**` or `.git/**`)."""
    core = [s.lower() for s in protected.core]
    if not core:  # a protected pattern of wildcards only: named by writing it out the same way
        return any(p.text == protected.pattern.text for p in rule.paths)
    for pattern in rule.paths:
        literal = [s.lower() for s in pattern.literal_segments]
        if pattern.matches(segments) and any(
            literal[i : i + len(core)] == core for i in range(len(literal) - len(core) + 1)
        ):
            return True
    return False


def _single(part: PartDecision) -> PolicyDecision:
    return PolicyDecision(decision=part.decision, reason=part.reason, rule=part.rule, parts=(part,))

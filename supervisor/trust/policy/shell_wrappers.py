"""Commands that run other commands: finding the command inside a wrapper.

Owns the table of wrappers (`env`, `timeout`, `nice`, `nohup`, `sudo`, `command`,
`exec`, `time`, `stdbuf`, `ionice`, `chroot`, `setsid`, `busybox`), the shells
whose `-c` script is parsed again, `xargs` and `find -exec`, and the builtins
that turn strings into code. Given one simple command's words it reports to a
`Sink` every command that would really run. Lexing belongs to `shell_words.py`.

Unwrapping is only ever used to see *more*: an unknown wrapper, or an option of
a known one that we cannot place, is reported as itself (or as opaque), so the
policy matches it by its own name and never silently lets its payload through.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Protocol

import msgspec

from bastion.supervisor.trust.policy.shell_facts import (
    OpaqueReason,
    Redirection,
    RedirectKind,
    SimpleCommand,
    Word,
)

XARGS_INPUT = "<xargs input>"  # stands for the arguments xargs appends at run time


class Sink(Protocol):
    def command(self, command: SimpleCommand) -> None: ...
    def opaque(self, reason: OpaqueReason, detail: str) -> None: ...
    def redirect(self, redirection: Redirection) -> None: ...
    def parse(self, script: str) -> None: ...  # a nested command line (a `-c` script)
    def changes_directory(self) -> None: ...


class _Wrapper(msgspec.Struct, frozen=True, kw_only=True):
    """How to find the command inside one wrapper; options are written as on the command line."""

    flags: frozenset[str] = frozenset()
    with_arg: frozenset[str] = frozenset()
    attached_arg: frozenset[str] = frozenset()  # -e[EOF]: the rest of the word, never the next one
    numeric: bool = False  # `nice -5`
    operands_before: int = 0  # `timeout DURATION cmd`, `chroot NEWROOT cmd`
    assignments: bool = False  # `env NAME=value cmd`
    privileged: bool = False  # reported itself as well, so a rule about it still applies
    nothing_runs: frozenset[str] = frozenset()  # `command -v`: the operands are not run
    shell_mode: frozenset[str] = frozenset()  # `sudo -s args`: the operands run as a script
    opaque: frozenset[str] = frozenset()  # `env -S STRING`: splits a string we would have to re-lex
    writes: frozenset[str] = frozenset()  # `time -o FILE`


def _opts(*names: str) -> frozenset[str]:
    return frozenset(names)


_WRAPPERS: dict[str, _Wrapper] = {
    "env": _Wrapper(
        flags=_opts("-i", "--ignore-environment", "-0", "--null", "-v", "--debug", "--default-signal",
                    "--ignore-signal", "--block-signal", "--list-signal-handling"),
        with_arg=_opts("-u", "--unset", "-C", "--chdir"),
        opaque=_opts("-S", "--split-string"),
        assignments=True,
    ),
    "timeout": _Wrapper(
        flags=_opts("--foreground", "--preserve-status", "-v", "--verbose"),
        with_arg=_opts("-s", "--signal", "-k", "--kill-after"),
        operands_before=1,
    ),
    "nice": _Wrapper(with_arg=_opts("-n", "--adjustment"), numeric=True),
    "nohup": _Wrapper(),
    "time": _Wrapper(
        flags=_opts("-p", "-a", "--append", "-v", "--verbose", "-q", "--quiet", "--portability"),
        with_arg=_opts("-f", "--format", "-o", "--output"),
        writes=_opts("-o", "--output"),
    ),
    "stdbuf": _Wrapper(with_arg=_opts("-i", "-o", "-e", "--input", "--output", "--error")),
    "ionice": _Wrapper(
        flags=_opts("-t", "--ignore"),
        with_arg=_opts("-c", "--class", "-n", "--classdata"),
        nothing_runs=_opts("-p", "--pid", "-P", "--pgid", "-u", "--uid"),
    ),
    "command": _Wrapper(flags=_opts("-p"), nothing_runs=_opts("-v", "-V")),
    "builtin": _Wrapper(),
    "exec": _Wrapper(flags=_opts("-c", "-l"), with_arg=_opts("-a")),
    "setsid": _Wrapper(flags=_opts("-c", "--ctty", "-f", "--fork", "-w", "--wait")),
    "busybox": _Wrapper(),
    "sudo": _Wrapper(
        flags=_opts("-A", "--askpass", "-b", "--background", "-E", "--preserve-env", "-H", "--set-home",
                    "-k", "--reset-timestamp", "-n", "--non-interactive", "-P", "--preserve-groups", "-S",
                    "--stdin", "-B", "--bell"),
        with_arg=_opts("-u", "--user", "-g", "--group", "-C", "--close-from", "-D", "--chdir", "-h", "--host",
                       "-p", "--prompt", "-r", "--role", "-t", "--type", "-U", "--other-user", "-T",
                       "--command-timeout"),
        shell_mode=_opts("-s", "--shell", "-i", "--login"),
        nothing_runs=_opts("-l", "--list", "-v", "--validate", "-V", "--version", "-K", "--remove-timestamp"),
        opaque=_opts("-e", "--edit"),
        assignments=True,
        privileged=True,
    ),
    "doas": _Wrapper(flags=_opts("-n"), with_arg=_opts("-u", "-C"), shell_mode=_opts("-s"), privileged=True),
    "chroot": _Wrapper(flags=_opts("--skip-chdir", "--userspec", "--groups"), operands_before=1,
                       privileged=True),
}

_XARGS = _Wrapper(
    flags=_opts("-0", "--null", "-p", "--interactive", "-r", "--no-run-if-empty", "-t", "--verbose", "-x",
                "--exit", "-o", "--open-tty", "--show-limits", "--eof", "--replace", "--max-lines"),
    with_arg=_opts("-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "-n", "--max-args", "-P",
                   "--max-procs", "-s", "--max-chars", "--process-slot-var"),
    attached_arg=_opts("-e", "-i", "-l"),
)

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh"})
_SHELL_LONG_FLAGS = _opts("--norc", "--noprofile", "--posix", "--login", "--restricted", "--noediting",
                          "--verbose", "--debugger", "--dump-strings", "--dump-po-strings", "--protected")
_SHELL_LONG_WITH_ARG = _opts("--rcfile", "--init-file")

_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
_FIND_WRITES = {"-fprint": 1, "-fprint0": 1, "-fls": 1, "-fprintf": 2}  # action -> words it takes

# Builtins that evaluate a string (or a file) as shell code.
_CODE_IN_STRING = frozenset({"eval", "trap", "let", "alias"})
_SOURCE = frozenset({".", "source"})
_CHDIR = frozenset({"cd", "pushd", "popd"})

_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")


def is_assignment(word: Word) -> bool:
    """NAME=value (the name itself unquoted, as the shell requires)."""
    found = _ASSIGNMENT.match(word.text)
    return found is not None and found.end() <= word.literal_prefix


def expand(words: Sequence[Word], assignments: tuple[str, ...], sink: Sink, *, xargs_input: bool = False) -> None:
    """Report the commands `words` would run (after `assignments`) to `sink`.

    `xargs_input`: the innermost command also gets xargs' input appended at run time."""
    if not words:
        if assignments:
            sink.command(SimpleCommand(argv=(), assignments=assignments))
        return
    name = words[0]
    if name.runtime or name.glob:
        sink.opaque(OpaqueReason.DYNAMIC_COMMAND, name.text)
        _emit(words, assignments, sink, xargs_input=xargs_input)
        return
    base = os.path.basename(name.text)
    if base in _WRAPPERS:
        _unwrap(_WRAPPERS[base], words, assignments, sink, xargs_input=xargs_input)
    elif base in SHELLS:
        _shell(words, assignments, sink, xargs_input=xargs_input)
    elif base == "xargs":
        _emit(words, assignments, sink)
        skipped = _skip_options(words, 1, _XARGS, sink)
        if skipped is not None and skipped[0] < len(words):
            expand(words[skipped[0]:], assignments, sink, xargs_input=True)
    elif base == "find":
        _find(words, assignments, sink)
    else:
        _plain(base, words, assignments, sink, xargs_input=xargs_input)


def _plain(base: str, words: Sequence[Word], assignments: tuple[str, ...], sink: Sink, *, xargs_input: bool) -> None:
    if base in _CODE_IN_STRING:
        sink.opaque(OpaqueReason.CODE_IN_STRING, _joined(words))
    elif base in _SOURCE:
        sink.opaque(OpaqueReason.SOURCE, _joined(words))
    elif base in _CHDIR:
        sink.changes_directory()
    _emit(words, assignments, sink, xargs_input=xargs_input)


def _unwrap(spec: _Wrapper, words: Sequence[Word], assignments: tuple[str, ...], sink: Sink, *,
            xargs_input: bool) -> None:
    if spec.privileged:
        _emit(words, assignments, sink)
    skipped = _skip_options(words, 1, spec, sink)
    if skipped is None:
        if not spec.privileged:
            _emit(words, assignments, sink)
        return
    start, seen = skipped
    if seen & spec.nothing_runs:
        if not spec.privileged:
            _emit(words, assignments, sink)
        return
    _note_writes(spec, words[1:start], sink)
    inner_assignments = assignments
    if spec.assignments:
        while start < len(words) and is_assignment(words[start]):
            inner_assignments += (words[start].text,)
            start += 1
    start += spec.operands_before
    if start >= len(words):
        # Nothing wrapped (`env`, `exec 3>&1`): the wrapper itself is what runs.
        if not spec.privileged and words[0].text != "exec":
            _emit(words, assignments, sink)
        return
    if seen & spec.shell_mode:
        sink.parse(" ".join(w.text for w in words[start:]))
        return
    expand(words[start:], inner_assignments, sink, xargs_input=xargs_input)


def _skip_options(words: Sequence[Word], i: int, spec: _Wrapper, sink: Sink) -> tuple[int, set[str]] | None:
    """The index of the first operand after the options and the options seen (clusters split),
    or None (reported opaque) when an option is unknown."""
    seen: set[str] = set()
    while i < len(words):
        word = words[i]
        text = word.text
        if word.runtime:
            sink.opaque(OpaqueReason.UNKNOWN_OPTION, f"{words[0].text}: {text} is only known at run time")
            return None
        if text == "--":
            return i + 1, seen
        if not text.startswith("-") or text == "-":
            return i, seen
        if spec.numeric and re.fullmatch(r"-\d+", text):
            i += 1
            continue
        step = _option_words(text, spec, seen)
        if step is None:
            sink.opaque(OpaqueReason.UNKNOWN_OPTION, f"{words[0].text} {text}")
            return None
        i += step
    return i, seen


def _option_words(text: str, spec: _Wrapper, seen: set[str]) -> int | None:
    """How many words the option `text` takes up (1 or 2), or None when it is unknown or opaque."""
    known = spec.flags | spec.nothing_runs | spec.shell_mode
    if text.startswith("--"):
        name, eq, _ = text.partition("=")
        seen.add(name)
        if name in spec.opaque:
            return None
        if name in spec.with_arg:
            return 1 if eq else 2
        return 1 if name in known else None
    for index, char in enumerate(text[1:], start=1):
        option = f"-{char}"
        seen.add(option)
        if option in spec.opaque:
            return None
        if option in spec.attached_arg:
            return 1
        if option in spec.with_arg:
            return 2 if index == len(text) - 1 else 1
        if option not in known:
            return None
    return 1


def _note_writes(spec: _Wrapper, options: Sequence[Word], sink: Sink) -> None:
    """Files a wrapper's options write: `time -o FILE`, `-oFILE`, `-po FILE`, `--output=FILE`."""
    for index, word in enumerate(options):
        text = word.text
        following = options[index + 1] if index + 1 < len(options) else None
        attached: str | None = None
        if text.startswith("--"):
            name, eq, value = text.partition("=")
            if name not in spec.writes:
                continue
            attached = value if eq else None
        elif text.startswith("-"):
            for pos, char in enumerate(text[1:], start=1):
                if f"-{char}" in spec.writes:
                    attached = text[pos + 1 :] or None
                    break
                if f"-{char}" in spec.with_arg:
                    break
            else:
                continue
            if f"-{text[pos]}" not in spec.writes:
                continue
        else:
            continue
        if attached is not None:
            sink.redirect(_write(word, attached))
        elif following is not None:
            sink.redirect(_write(following, following.text))


def _shell(words: Sequence[Word], assignments: tuple[str, ...], sink: Sink, *, xargs_input: bool) -> None:
    i, script_mode = 1, False
    while i < len(words) and words[i].text[:1] in ("-", "+") and words[i].text not in ("-", "+"):
        text = words[i].text
        if words[i].runtime:
            sink.opaque(OpaqueReason.UNKNOWN_OPTION, f"{words[0].text}: {text} is only known at run time")
            _emit(words, assignments, sink, xargs_input=xargs_input)
            return
        i += 1
        if text in ("--", "-"):
            break
        if text.startswith("--"):
            if text in _SHELL_LONG_WITH_ARG:
                i += 1
            elif text not in _SHELL_LONG_FLAGS:
                sink.opaque(OpaqueReason.UNKNOWN_OPTION, f"{words[0].text} {text}")
                _emit(words, assignments, sink, xargs_input=xargs_input)
                return
            continue
        script_mode = script_mode or "c" in text[1:]
        if not text[1:].isalpha():
            sink.opaque(OpaqueReason.UNKNOWN_OPTION, f"{words[0].text} {text}")
        if text[-1] in ("o", "O"):
            i += 1  # -o OPTION / +O SHOPT
    if not script_mode or i >= len(words):
        # A script file or stdin: matched as the shell itself.
        _emit(words, assignments, sink, xargs_input=xargs_input)
        return
    if assignments or xargs_input:
        # The environment (BASH_ENV, PATH) or appended arguments change what the script does.
        _emit(words, assignments, sink, xargs_input=xargs_input)
    script = words[i]
    if script.runtime:
        sink.opaque(OpaqueReason.DYNAMIC_PAYLOAD, f"{words[0].text} -c {script.text}")
        return
    sink.parse(script.text)


def _find(words: Sequence[Word], assignments: tuple[str, ...], sink: Sink) -> None:
    _emit(words, assignments, sink)
    i = 1
    while i < len(words):
        text = words[i].text
        if text in _FIND_EXEC:
            end = i + 1
            while end < len(words) and not _ends_exec(words, end):
                end += 1
            expand(words[i + 1 : end], assignments, sink)
            i = end + 1
        elif text in _FIND_WRITES:
            if i + 1 < len(words):
                sink.redirect(_write(words[i + 1], words[i + 1].text))
            i += 1 + _FIND_WRITES[text]
        else:
            i += 1


def _ends_exec(words: Sequence[Word], i: int) -> bool:
    text = words[i].text
    return text == ";" or (text == "+" and words[i - 1].text == "{}")


def _write(word: Word, target: str) -> Redirection:
    return Redirection(kind=RedirectKind.WRITE, target=target, runtime=word.runtime or word.glob,
                       from_home=word.tilde)


def _emit(words: Sequence[Word], assignments: tuple[str, ...], sink: Sink, *, xargs_input: bool = False) -> None:
    runtime = tuple(w.text for w in words if w.runtime or (w.glob and w is words[0]))
    if xargs_input:
        runtime += (XARGS_INPUT,)
    sink.command(SimpleCommand(argv=tuple(w.text for w in words), assignments=assignments,
                               runtime_words=runtime))


def _joined(words: Sequence[Word]) -> str:
    return " ".join(w.text for w in words)

"""What a shell command line would do, as far as the policy can tell without running it.

Owns the result types of parsing a command line (`ParsedCommand` and its parts)
and `Word`, one shell word after quote removal. Parsing lives in `shell_words.py`
and wrapper unwrapping in `shell_wrappers.py`; this module holds data only, so
both can share it without importing each other.
"""

from __future__ import annotations

import enum

import msgspec


class OpaqueReason(enum.Enum):
    """Why part of a command line cannot be analysed; any of them rules out `allow`."""

    UNBALANCED = "unbalanced"  # an unclosed quote, substitution or parenthesis
    HEREDOC = "heredoc"  # `<<` bodies are not analysed
    CODE_IN_STRING = "code_in_string"  # eval, trap, let, alias: a string becomes code
    SOURCE = "source"  # `source` / `.` run a file's contents
    DYNAMIC_COMMAND = "dynamic_command"  # the command name is only known at run time
    DYNAMIC_PAYLOAD = "dynamic_payload"  # `bash -c "$X"`: the script is only known at run time
    UNSUPPORTED_SYNTAX = "unsupported_syntax"  # for/case/[[/((, functions, arrays, ${…} operators
    UNKNOWN_OPTION = "unknown_option"  # a wrapper option that hides where its command starts
    TOO_COMPLEX = "too_complex"  # nested too deep, or too long to analyse


class Opacity(msgspec.Struct, frozen=True, kw_only=True):
    reason: OpaqueReason
    detail: str  # the fragment, for the reason a user reads


class RedirectKind(enum.Enum):
    READ = "read"
    WRITE = "write"  # also `<>` and files a wrapper writes (`time -o`, `find -fprint`)


class Redirection(msgspec.Struct, frozen=True, kw_only=True):
    kind: RedirectKind
    target: str
    runtime: bool = False  # the target holds an expansion or a glob: only known at run time
    from_home: bool = False  # an unquoted leading `~`: the target is under $HOME


class SimpleCommand(msgspec.Struct, frozen=True, kw_only=True):
    """One program (or builtin) the line would run, with its argv after quote removal.

    Words holding an expansion keep their source text (`$HOME/x`, `$(…)`) and are
    also listed in `runtime_words`; a command with any of them cannot be matched
    with certainty. An empty argv with assignments is a bare `NAME=value`."""

    argv: tuple[str, ...]
    assignments: tuple[str, ...] = ()  # NAME=value in its environment (or the shell's)
    runtime_words: tuple[str, ...] = ()


class ParsedCommand(msgspec.Struct, frozen=True, kw_only=True):
    commands: tuple[SimpleCommand, ...]
    redirections: tuple[Redirection, ...] = ()
    opaque: tuple[Opacity, ...] = ()
    # A `cd`/`pushd`/`popd` somewhere: relative redirection targets may not be where they look.
    changes_directory: bool = False

    @property
    def is_opaque(self) -> bool:
        return bool(self.opaque)


class Word(msgspec.Struct, frozen=True, kw_only=True):
    """One word as the lexer read it."""

    text: str  # quotes removed; expansions kept as written
    runtime: bool = False  # holds $VAR, ${…}, $(…), `…`, <(…)
    glob: bool = False  # unquoted * ? [ or a brace expansion
    quoted: bool = False  # any part was quoted or escaped
    tilde: bool = False  # starts with an unquoted ~
    literal_prefix: int = 0  # chars before the first quote or expansion (assignments need NAME= there)

"""Parsing a shell command line into the simple commands it would run.

Owns `parse_command`: a conservative reading of POSIX sh (with the bash
extensions a model is likely to write). It splits on `;`, `&&`, `||`, `|`, `&`
and newlines; descends into `$(…)`, backticks, `<(…)`/`>(…)`, subshells and
`{ …; }` groups and if/while bodies; collects redirection targets; and hands
each simple command to `shell_wrappers.expand`, which looks inside wrappers,
`-c` scripts, `xargs` and `find -exec`. It never runs anything.

Why not `shlex`: it drops the difference between `'$(x)'` (text) and `"$(x)"`
(a command that runs), and it cannot find where a nested `$(…)` ends. Quoting
here follows the shell's own rules instead, so the two read differently.

Whatever it cannot read with confidence (unclosed quotes, here-docs, `eval`,
a command name only known at run time, `for`/`case`, arithmetic, function
definitions) is reported in `ParsedCommand.opaque`; the policy never allows an
opaque command. Parsing goes on past an opaque part, so a `deny` rule still
sees the rest.
"""

from __future__ import annotations

import enum
import re

import msgspec

from bastion.supervisor.trust.policy.shell_facts import (
    Opacity,
    OpaqueReason,
    ParsedCommand,
    Redirection,
    RedirectKind,
    SimpleCommand,
    Word,
)
from bastion.supervisor.trust.policy.shell_wrappers import expand, is_assignment

MAX_DEPTH = 12  # nested substitutions and -c scripts
MAX_LENGTH = 64 * 1024

_OPERATORS = (";;&", ";;", ";&", "&&", "||", "|&", "|", "&", ";", "(", ")")
_REDIRECTS = ("<<<", "<<-", "<<", "&>>", "&>", ">>", ">|", ">&", "<&", "<>", ">", "<")
_BLANK = " \t"
_WORD_END = " \t\n;&|()<>"
# Reserved words that only separate or group commands.
_GROUPING = frozenset({"if", "then", "elif", "else", "fi", "while", "until", "do", "done", "!", "{", "}"})
_UNSUPPORTED = frozenset({"for", "case", "esac", "select", "function", "coproc", "[[", "]]", "in"})
_SIMPLE_PARAMETER = re.compile(r"#?([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-])")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_command(command: str) -> ParsedCommand:
    """The simple commands `command` would run, its redirections, and what could not be read."""
    collector = _Collector()
    if len(command) > MAX_LENGTH:
        collector.opaque(OpaqueReason.TOO_COMPLEX, f"{len(command)} characters")
    else:
        _Parser(command, collector, depth=0).parse_list(closer=None)
    return ParsedCommand(
        commands=tuple(collector.commands),
        redirections=tuple(collector.redirections),
        opaque=tuple(collector.opacities),
        changes_directory=collector.chdir,
    )


class _Collector:
    """Everything found, across nested parses."""

    def __init__(self) -> None:
        self.commands: list[SimpleCommand] = []
        self.redirections: list[Redirection] = []
        self.opacities: list[Opacity] = []
        self.chdir = False

    def opaque(self, reason: OpaqueReason, detail: str) -> None:
        self.opacities.append(Opacity(reason=reason, detail=detail))


class _Sink:
    """What `shell_wrappers.expand` reports to, on behalf of one parser."""

    def __init__(self, collector: _Collector, parser: _Parser) -> None:
        self._collector = collector
        self._parser = parser

    def command(self, command: SimpleCommand) -> None:
        self._collector.commands.append(command)

    def opaque(self, reason: OpaqueReason, detail: str) -> None:
        self._collector.opaque(reason, detail)

    def redirect(self, redirection: Redirection) -> None:
        self._collector.redirections.append(redirection)

    def parse(self, script: str) -> None:
        _Parser(script, self._collector, depth=self._parser.depth + 1).parse_list(closer=None)

    def changes_directory(self) -> None:
        self._collector.chdir = True


class _Kind(enum.Enum):
    WORD = "word"
    OPERATOR = "operator"
    REDIRECT = "redirect"
    END = "end"


class _Token(msgspec.Struct, frozen=True):
    kind: _Kind
    op: str = ""
    word: Word | None = None


class _Parser:
    def __init__(self, text: str, collector: _Collector, *, depth: int) -> None:
        self.text = text
        self.pos = 0
        self.collector = collector
        self.depth = depth
        self.sink = _Sink(collector, self)
        if depth > MAX_DEPTH:
            collector.opaque(OpaqueReason.TOO_COMPLEX, "nested too deep")
            self.pos = len(text)

    def opaque(self, reason: OpaqueReason, detail: str) -> None:
        self.collector.opaque(reason, detail)

    # --- commands -------------------------------------------------------------

    def parse_list(self, closer: str | None) -> None:
        """Parse commands up to `closer` (`)` of a substitution or subshell) or the end."""
        words: list[Word] = []
        assignments: list[str] = []

        def finish() -> None:
            if words or assignments:
                expand(words, tuple(assignments), self.sink)
            words.clear()
            assignments.clear()

        while True:
            token = self._next()
            if token.kind is _Kind.END:
                if closer is not None:
                    self.opaque(OpaqueReason.UNBALANCED, f"missing {closer!r}")
                finish()
                return
            if token.kind is _Kind.OPERATOR:
                if token.op == ")":
                    finish()
                    if closer == ")":
                        return
                    self.opaque(OpaqueReason.UNBALANCED, "unexpected ')'")
                elif token.op == "(":
                    if words or assignments:
                        self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, "'(' after a word (a function or an array)")
                        finish()
                    if self.text.startswith("(", self.pos):
                        self._arithmetic(self.pos + 1)
                    else:
                        # Whatever the parenthesis means, the commands inside it are still found.
                        self._nested_list()
                elif token.op in (";;", ";&", ";;&"):
                    self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, token.op)
                    finish()
                else:
                    finish()
            elif token.kind is _Kind.REDIRECT:
                self._redirect(token)
            else:
                assert token.word is not None
                self._word(token.word, words, assignments)

    def _word(self, word: Word, words: list[Word], assignments: list[str]) -> None:
        at_start = not words and not assignments
        bare = not word.quoted and not word.runtime
        if at_start and bare and word.text in _GROUPING:
            return
        if at_start and bare and word.text in _UNSUPPORTED:
            self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, word.text)
            return
        if not words and is_assignment(word):
            assignments.append(word.text)
            return
        words.append(word)

    def _redirect(self, token: _Token) -> None:
        if token.op in ("<<", "<<-"):
            self.opaque(OpaqueReason.HEREDOC, token.op)
        before = self.pos
        target = self._next()
        if target.word is None:
            self.opaque(OpaqueReason.UNBALANCED, f"{token.op} without a target")
            self.pos = before  # the operator still separates (or closes) what follows
            return
        word = target.word
        if token.op in ("<<", "<<-", "<<<"):
            return  # text on stdin, not a file
        if token.op in (">&", "<&") and (word.text.isdigit() or word.text == "-"):
            return  # duplicating or closing a descriptor
        kind = RedirectKind.READ if token.op in ("<", "<&") else RedirectKind.WRITE
        self.collector.redirections.append(
            Redirection(kind=kind, target=word.text, runtime=word.runtime or word.glob, from_home=word.tilde)
        )

    # --- tokens ---------------------------------------------------------------

    def _next(self) -> _Token:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _BLANK:
                self.pos += 1
            elif text.startswith("\\\n", self.pos):
                self.pos += 2
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                break
        if self.pos >= len(text):
            return _Token(_Kind.END)
        if text[self.pos] == "\n":
            self.pos += 1
            return _Token(_Kind.OPERATOR, op=";")
        if text.startswith(("<(", ">("), self.pos):
            return _Token(_Kind.WORD, word=self._read_word())
        for op in _REDIRECTS:
            if text.startswith(op, self.pos):
                self.pos += len(op)
                return _Token(_Kind.REDIRECT, op=op)
        for op in _OPERATORS:
            if text.startswith(op, self.pos):
                self.pos += len(op)
                return _Token(_Kind.OPERATOR, op=op)
        word = self._read_word()
        # `2>file`: digits right before a redirection name the descriptor, which policy ignores.
        if word.text.isascii() and word.text.isdigit() and not word.quoted and text.startswith(("<", ">"), self.pos):
            if not text.startswith(("<(", ">("), self.pos):
                return self._next()
        return _Token(_Kind.WORD, word=word)

    def _read_word(self) -> Word:
        text = self.text
        start = self.pos
        out: list[str] = []
        runtime = glob = quoted = False
        literal_prefix: int | None = None
        braces = ""
        while self.pos < len(text):
            char = text[self.pos]
            if self.pos == start and text.startswith(("<(", ">("), self.pos):
                self.pos += 2
                self._nested_list()
                out.append(text[start : self.pos])
                runtime = True
                literal_prefix = 0 if literal_prefix is None else literal_prefix
                continue
            if char in _WORD_END:
                break
            if char in "\\'\"$`" and literal_prefix is None:
                literal_prefix = len("".join(out))
            if char == "\\":
                quoted = True
                if text.startswith("\\\n", self.pos):
                    self.pos += 2
                    continue
                out.append(text[self.pos + 1 : self.pos + 2])
                self.pos += 2
            elif char == "'":
                quoted = True
                end = text.find("'", self.pos + 1)
                if end < 0:
                    self.opaque(OpaqueReason.UNBALANCED, "unclosed '")
                    out.append(text[self.pos + 1 :])
                    self.pos = len(text)
                    break
                out.append(text[self.pos + 1 : end])
                self.pos = end + 1
            elif char == '"':
                quoted = True
                runtime = self._double_quoted(out) or runtime
            elif char == "$":
                runtime = self._dollar(out) or runtime
            elif char == "`":
                self._backticks(out)
                runtime = True
            else:
                if char in "*?[":
                    glob = True
                elif char in "{}":
                    braces += char
                out.append(char)
                self.pos += 1
        word_text = "".join(out)
        # `{a,b}` and `{1..3}` expand to several words (`{}` alone is find's placeholder).
        if "{" in braces and "}" in braces and word_text not in ("{}", "{", "}"):
            glob = True
        return Word(
            text=word_text,
            runtime=runtime,
            glob=glob,
            quoted=quoted,
            tilde=text.startswith("~", start),
            literal_prefix=len(word_text) if literal_prefix is None else literal_prefix,
        )

    def _double_quoted(self, out: list[str]) -> bool:
        """Read `"…"` from its opening quote; True when it holds an expansion."""
        text = self.text
        self.pos += 1
        runtime = False
        while self.pos < len(text):
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return runtime
            if char == "\\" and text[self.pos + 1 : self.pos + 2] in ('"', "\\", "$", "`", "\n"):
                if text[self.pos + 1] != "\n":
                    out.append(text[self.pos + 1])
                self.pos += 2
            elif char == "$":
                runtime = self._dollar(out) or runtime
            elif char == "`":
                self._backticks(out)
                runtime = True
            else:
                out.append(char)
                self.pos += 1
        self.opaque(OpaqueReason.UNBALANCED, 'unclosed "')
        return runtime

    def _dollar(self, out: list[str]) -> bool:
        """Read an expansion starting at `$`; True unless the `$` was literal."""
        text = self.text
        start = self.pos
        after = text[start + 1 : start + 2]
        if text.startswith("((", start + 1):
            self._arithmetic(start + 3)
        elif after == "(":
            self.pos += 2
            self._nested_list()
        elif after == "{":
            self._parameter()
        elif after == "'":
            self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, "$'…' quoting")
            quoted = re.compile(r"(?:[^'\\]|\\.)*'", re.S).match(text, start + 2)
            self.pos = len(text) if quoted is None else quoted.end()
        elif after == "[":
            self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, "$[…] arithmetic")
            end = text.find("]", start)
            self.pos = len(text) if end < 0 else end + 1
        elif after == '"':
            self.pos += 1  # $"…" is a translated string: read as "…"
            return False
        elif after and (after in "@*#?$!-" or after.isdigit()):
            self.pos += 2
        elif name := _NAME.match(text, start + 1):
            self.pos = name.end()
        else:
            out.append("$")
            self.pos += 1
            return False
        out.append(text[start : self.pos])
        return True

    def _nested_list(self) -> None:
        """The commands of `$(…)`, `<(…)`, `>(…)` or `( … )`, the opener already consumed."""
        if self.depth >= MAX_DEPTH:
            # Python's own stack is the limit here; what is left is not analysed at all.
            self.opaque(OpaqueReason.TOO_COMPLEX, "nested too deep")
            self.pos = len(self.text)
            return
        self.depth += 1
        self.parse_list(closer=")")
        self.depth -= 1

    def _parameter(self) -> None:
        """`${…}`: a plain parameter is a runtime word; anything fancier is opaque, but any
        command substitution inside it is still parsed."""
        text = self.text
        start = self.pos
        depth, i = 0, start + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if i >= len(text):
            self.opaque(OpaqueReason.UNBALANCED, "unclosed ${")
            self.pos = len(text)
            return
        body = text[start + 2 : i]
        self.pos = i + 1
        if _SIMPLE_PARAMETER.fullmatch(body):
            return
        self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, f"${{{body}}}")
        self._scan_nested(body)

    def _arithmetic(self, body_start: int) -> None:
        """`((…))` or `$((…))` with `body_start` just inside: opaque (bash evaluates array
        subscripts in variables' values as code), but substitutions inside are still parsed."""
        text = self.text
        depth, i = 2, body_start
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        self.opaque(OpaqueReason.UNSUPPORTED_SYNTAX, "((…)) arithmetic")
        if depth:
            self.opaque(OpaqueReason.UNBALANCED, "unclosed ((")
        self.pos = i
        self._scan_nested(text[body_start : max(body_start, i - 2)])

    def _scan_nested(self, fragment: str) -> None:
        """Parse the substitutions in a fragment that is not itself a command line."""
        if "$" not in fragment and "`" not in fragment:
            return
        nested = _Parser(fragment, self.collector, depth=self.depth + 1)
        while nested.pos < len(nested.text):
            before = nested.pos
            nested._read_word()
            nested.pos = max(nested.pos, before + 1)

    def _backticks(self, out: list[str]) -> None:
        text = self.text
        start = self.pos
        body: list[str] = []
        i = start + 1
        while i < len(text) and text[i] != "`":
            if text[i] == "\\" and i + 1 < len(text):
                body.append(text[i + 1] if text[i + 1] in "$`\\" else text[i : i + 2])
                i += 2
            else:
                body.append(text[i])
                i += 1
        if i >= len(text):
            self.opaque(OpaqueReason.UNBALANCED, "unclosed `")
        self.pos = min(i + 1, len(text))
        out.append(text[start : self.pos])
        self.sink.parse("".join(body))

"""Matching what a rule names against what a call touches.

Owns the three kinds of pattern a policy file writes and their semantics:

- tool names: `fnmatch` globs (`read_*`);
- commands: words, split like a shell would (`git diff*`, `"rm" -rf *`). Each
  pattern word is a glob matched against one argv word; a word that is exactly
  `**` matches any run of words (none included). A pattern is a prefix:
  `git status` also matches `git status --short`;
- paths: workspace-relative, `/`-separated globs where `*` stays within one
  segment and a `**` segment matches any number of segments (`src/**` matches
  `src` and everything below it).

It knows nothing of decisions or files; `engine.py` decides what a match means.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from fnmatch import fnmatchcase

import msgspec

_MAGIC = frozenset("*?[")


def is_magic(segment: str) -> bool:
    return any(char in _MAGIC for char in segment)


def tool_matches(globs: Sequence[str], name: str) -> bool:
    return any(fnmatchcase(name, glob) for glob in globs)


def match_sequence(pattern: Sequence[str], items: Sequence[str], *, prefix: bool) -> bool:
    """Glob-per-element matching with `**` for any run of elements; linear in len(items)
    per pattern element, so a long argv cannot make it blow up."""
    reachable = [True] + [False] * len(items)
    for element in pattern:
        following = [False] * (len(items) + 1)
        if element == "**":
            seen = False
            for j, ok in enumerate(reachable):
                seen = seen or ok
                following[j] = seen
        else:
            for j in range(1, len(items) + 1):
                following[j] = reachable[j - 1] and fnmatchcase(items[j - 1], element)
        reachable = following
    return any(reachable) if prefix else reachable[-1]


class CommandPattern(msgspec.Struct, frozen=True, kw_only=True):
    text: str  # as written in the policy file
    words: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> CommandPattern:
        """Raises ValueError for an empty pattern or unbalanced quotes."""
        words = tuple(shlex.split(text))
        if not words:
            raise ValueError("an empty command pattern")
        return cls(text=text, words=words)

    def matches(self, argv: Sequence[str], *, by_basename: bool) -> bool:
        """`by_basename`: `/bin/rm` also counts as `rm` (for deny and ask: never for allow,
        where `./ls` in the workspace must not pass as `ls`)."""
        if match_sequence(self.words, argv, prefix=True):
            return True
        if by_basename and argv and "/" in argv[0] and "/" not in self.words[0]:
            name = argv[0].rstrip("/").rsplit("/", 1)[-1]
            return match_sequence(self.words, (name, *argv[1:]), prefix=True)
        return False


class PathPattern(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        """Raises ValueError for an absolute pattern or one with `..` (rules only speak of the workspace)."""
        cleaned = text.strip()
        if not cleaned:
            raise ValueError("an empty path pattern")
        if cleaned.startswith(("/", "~")):
            raise ValueError(f"{text!r}: paths are relative to the workspace")
        segments = tuple(s for s in cleaned.split("/") if s not in ("", "."))
        if ".." in segments:
            raise ValueError(f"{text!r}: '..' cannot appear in a path pattern")
        return cls(text=text, segments=segments)

    @classmethod
    def literal(cls, segments: Sequence[str]) -> PathPattern:
        """A pattern matching exactly these segments, whatever characters they hold."""
        escaped = tuple("".join(f"[{c}]" if c in _MAGIC else c for c in s) for s in segments)
        return cls(text="/".join(segments), segments=escaped)

    def matches(self, segments: Sequence[str], *, fold_case: bool = False) -> bool:
        if fold_case:
            return match_sequence([s.lower() for s in self.segments], [s.lower() for s in segments], prefix=False)
        return match_sequence(self.segments, segments, prefix=False)

    @property
    def literal_segments(self) -> tuple[str, ...]:
        """The segments without wildcards, in order (how specifically the pattern names a place)."""
        return tuple(s for s in self.segments if not is_magic(s))

"""Constrained decoding for tool calls: a `CallGrammar` turned into a llama.cpp
grammar sampler, compiled once per grammar and cloned for each generation.

`call_gbnf` writes the GBNF: `root ::= PREFIX call SUFFIX`, where `call` is
the JSON schema converted by llama-cpp-python's own schema converter (the one
its JSON mode uses), so every value the grammar admits is a JSON value that
schema accepts. A schema the converter cannot express raises `GrammarError`;
the generation then runs unconstrained and its stats say why.

`GrammarCache` keeps one parsed grammar sampler per grammar text (a few, least
recently used first out): a tool set's grammar is compiled on its first use
and every later generation with the same tools gets a clone, whose state
starts fresh. A lazy grammar waits for its prefix to appear in the reply
(llama.cpp's trigger patterns: the buffered text from the first capture group
on is fed to the grammar), so a model that answers without a call is not
forced into one.

Importing this module imports llama_cpp; only the llama engine does.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json

import llama_cpp
from llama_cpp.llama_grammar import SchemaConverter

from bastion.protocol.worker_wire import CallGrammar

_ECMASCRIPT_SPECIAL = frozenset("\\^$.|?*+()[]{}/")


class GrammarError(Exception):
    """The call's schema cannot be expressed as a grammar (or llama.cpp refused it)."""


# A grammar this long is a schema that asked for too much (the protocol bounds it first).
MAX_GBNF_BYTES = 4 * 1024 * 1024


def call_gbnf(spec: CallGrammar) -> str:
    """The GBNF of `prefix`, one JSON value matching `schema`, then `suffix`."""
    problem = spec.problem()
    if problem is not None:
        raise GrammarError(f"the schema is too large for a grammar: {problem}")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(json.loads(json.dumps(spec.schema)), "bastion://tools")
        call_rule = converter.visit(schema, "call")
    except (ValueError, KeyError, TypeError, NotImplementedError, RecursionError, AssertionError) as exc:
        raise GrammarError(f"the tool schema cannot be turned into a grammar: {exc}") from exc
    parts = [_literal(spec.prefix), call_rule, _literal(spec.suffix)]
    root = "root ::= " + " ".join(part for part in parts if part)
    gbnf = root + "\n" + converter.format_grammar()
    if len(gbnf) > MAX_GBNF_BYTES:
        raise GrammarError(f"the schema's grammar is {len(gbnf)} bytes; at most {MAX_GBNF_BYTES}")
    return gbnf


def trigger_pattern(trigger: str) -> str:
    """A llama.cpp trigger pattern that fires once `trigger` has been written,
    feeding the grammar from the trigger on (the first capture group)."""
    escaped = "".join("\\" + char if char in _ECMASCRIPT_SPECIAL else char for char in trigger)
    return f"[\\s\\S]*?({escaped})[\\s\\S]*"


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""  # a GBNF literal escapes as a JSON string does


class GrammarCache:
    def __init__(self, vocab: llama_cpp.llama_vocab_p, capacity: int = 8) -> None:
        self._vocab = vocab
        self._capacity = capacity
        self._prototypes: collections.OrderedDict[str, llama_cpp.llama_sampler_p] = collections.OrderedDict()
        self.compiled = 0  # grammars parsed so far (a repeated tool set is not parsed again)

    def sampler_for(self, spec: CallGrammar) -> llama_cpp.llama_sampler_p:
        """A fresh grammar sampler for `spec`, owned by the caller (add it to a chain, which frees it)."""
        gbnf = call_gbnf(spec)
        key = hashlib.blake2b(f"{spec.lazy}\0{spec.start}\0{gbnf}".encode(), digest_size=16).hexdigest()
        prototype = self._prototypes.get(key)
        if prototype is None:
            prototype = self._compile(gbnf, spec)
            self.compiled += 1
            self._prototypes[key] = prototype
            while len(self._prototypes) > self._capacity:
                _, oldest = self._prototypes.popitem(last=False)
                llama_cpp.llama_sampler_free(oldest)
        else:
            self._prototypes.move_to_end(key)
        return llama_cpp.llama_sampler_clone(prototype)

    def _compile(self, gbnf: str, spec: CallGrammar) -> llama_cpp.llama_sampler_p:
        if spec.lazy and spec.start:
            patterns = (ctypes.c_char_p * 1)(trigger_pattern(spec.start).encode())
            no_tokens = (llama_cpp.llama_token * 0)()
            sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, gbnf.encode(), b"root", patterns, 1, no_tokens, 0
            )
        else:
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise GrammarError("llama.cpp could not parse the grammar for the tool schema")
        return sampler

    def close(self) -> None:
        while self._prototypes:
            _, sampler = self._prototypes.popitem()
            llama_cpp.llama_sampler_free(sampler)

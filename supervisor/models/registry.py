"""The models bastion knows by name, and what a name (or a path) the user gives resolves to.

Owns `ModelSpec`, the registry file format and `ModelRegistry`. The registry
is the bundled `bastion.configs/models.toml` overlaid by the user's
`<home>/config.toml` (only its `default` key, `[models.*]` tables and the
`[memory]` table; the rest of that file belongs to other parts of the
supervisor). A user entry that names a source (`source` or `path`) replaces the
bundled entry of that name; one that names none adjusts the bundled entry
field by field.

`[memory]` holds `budget` (a size such as "8GiB", or a share of the memory
available at start such as "60%") and `keep_alive` (the idle time before a
model is unloaded, for models whose entry sets none; default 5 minutes, -1
never). Both are read again whenever the file changes, like the models.

Every problem in either file is a RegistryError naming the file, the line when
it is known, and the key path (`models.foo.n_ctx`). Locating and assembling the
GGUF a spec points at is sources.py's job; lookup only checks that a
path given on the command line is a GGUF.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, UnsetType

from bastion.protocol import MAX_PARALLEL, HomeLayout, KvCacheType
from bastion.protocol.quantities import parse_duration, parse_size
from bastion.protocol.remote import RemoteEndpoint, RemoteEngine, RemoteMode
from bastion.supervisor.errors import InvalidModelFileError, RegistryError, UnknownModelError
from bastion.supervisor.models.memory import BudgetSetting, parse_budget
from bastion.supervisor.models.sources import LocalPath, ModelSource, ScriptedReplies, read_gguf_header
from bastion.supervisor.templates.formatter import BuiltinTemplate

DEFAULT_N_CTX = 4096
# As Ollama: an idle model gives its memory back after five minutes. Memory
# pressure is the budget's job (LRU unloading); this is about not holding
# hundreds of MiB for a model nobody has used in a while.
DEFAULT_KEEP_ALIVE_S = 300.0
# Requests a remote model's worker has in flight at once, unless its entry says:
# llama.cpp's server has 4 slots by default.
REMOTE_PARALLEL = 4
# `scripted:FILE` names a scripted model: canned replies, for tests and evals.
SCRIPTED_PREFIX = "scripted:"
_BUNDLED_PACKAGE = "bastion.configs"
_BUNDLED_FILE = "models.toml"
# Names must not look like paths: lookup() treats those as files.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # Where its GGUF is, or the remote engine that serves it (then n_ctx 0 means: the server's own).
    source: ModelSource | RemoteEndpoint
    n_ctx: int = DEFAULT_N_CTX
    threads: int | None = None  # None: the worker picks
    # Flash attention in the worker (faster prefill, no per-position score buffers).
    flash_attn: bool = True
    # f16, or q8_0: about half the KV memory (and snapshot bytes), needs flash attention.
    kv_cache_type: KvCacheType = KvCacheType.F16
    # Requests its worker decodes together (continuous batching), each in a KV
    # sequence of its own with n_ctx positions: the KV memory grows as much.
    parallel: int = 1
    template: BuiltinTemplate | None = None  # None: the GGUF's own, else by architecture
    description: str = ""
    # Seconds idle before the model is unloaded; -1 never, 0 as soon as it is idle.
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    # Per-session KV snapshot caps for its worker ([memory] kv_ram / kv_disk);
    # None: the supervisor's defaults.
    kv_ram_bytes: int | None = None
    kv_disk_bytes: int | None = None
    # A remote model's GGUF, or one with the same vocabulary, here: its prompts' tokens are then
    # counted exactly (by a vocabulary-only load) instead of estimated.
    vocab: str | None = None


class MemorySettings(msgspec.Struct, frozen=True, kw_only=True):
    """The `[memory]` table of config.toml; None where it sets nothing."""

    budget: BudgetSetting | None = None
    keep_alive_s: float | None = None
    kv_ram_bytes: int | None = None  # 0 turns the tier off
    kv_disk_bytes: int | None = None


class _Entry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[models.<name>]` table as written; UNSET marks what the file left out."""

    source: ModelSource | UnsetType = UNSET
    path: str | UnsetType = UNSET
    n_ctx: Annotated[int, msgspec.Meta(ge=16)] | UnsetType = UNSET
    threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | UnsetType = UNSET
    flash_attn: bool | UnsetType = UNSET
    kv_cache_type: KvCacheType | UnsetType = UNSET
    parallel: Annotated[int, msgspec.Meta(ge=1, le=MAX_PARALLEL)] | UnsetType = UNSET
    template: BuiltinTemplate | UnsetType = UNSET
    description: str | UnsetType = UNSET
    keep_alive: str | int | float | UnsetType = UNSET
    # A remote engine (protocol/remote.py) instead of a GGUF.
    engine: RemoteEngine | UnsetType = UNSET
    url: str | UnsetType = UNSET
    urls: list[str] | UnsetType = UNSET
    model: str | UnsetType = UNSET
    api_key_env: str | UnsetType = UNSET
    api_key_file: str | UnsetType = UNSET
    api_key: str | UnsetType = UNSET  # refused: secrets never live in config.toml
    mode: RemoteMode | UnsetType = UNSET
    connect_timeout: str | int | float | UnsetType = UNSET
    idle_timeout: str | int | float | UnsetType = UNSET
    vocab: str | UnsetType = UNSET

    def remote_keys(self) -> list[str]:
        return [key for key in _REMOTE_KEYS if getattr(self, key) is not UNSET]


_REMOTE_KEYS = ("engine", "url", "urls", "model", "api_key_env", "api_key_file", "mode", "connect_timeout", "idle_timeout",
                "vocab")


class _Layer(msgspec.Struct, frozen=True, kw_only=True):
    """What one file contributes."""

    file: str
    text: str
    default: str | None
    entries: dict[str, _Entry]
    memory: MemorySettings | None = None


class ModelRegistry:
    def __init__(
        self, models: Mapping[str, ModelSpec], default_name: str, memory: MemorySettings | None = None
    ) -> None:
        if default_name not in models:
            raise RegistryError(f"default model {default_name!r} is not among {sorted(models)}")
        self._models = dict(models)
        self.default_name = default_name
        self.memory = memory or MemorySettings()

    @classmethod
    def load(cls, layout: HomeLayout) -> ModelRegistry:
        """The bundled registry overlaid by `layout.config_file` (if it exists)."""
        bundled = resources.files(_BUNDLED_PACKAGE).joinpath(_BUNDLED_FILE)
        layers = [_read_layer(str(bundled), bundled.read_text(encoding="utf-8"), user=False)]
        try:
            user_text = layout.config_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{layout.config_file}: cannot read: {exc}") from exc
        else:
            layers.append(_read_layer(str(layout.config_file), user_text, user=True))
        return _merge(layers)

    def names(self) -> list[str]:
        return sorted(self._models)

    def specs(self) -> list[ModelSpec]:
        return [self._models[name] for name in self.names()]

    def lookup(self, name_or_path: str | None) -> ModelSpec:
        """None: the default model; a registry name: its spec; a path to a .gguf: an ad-hoc spec.

        Raises UnknownModelError (listing the known names), or InvalidModelFileError
        for a path that is missing or not a GGUF."""
        if name_or_path is None:
            return self._models[self.default_name]
        if name_or_path in self._models:
            return self._models[name_or_path]
        if name_or_path.startswith(SCRIPTED_PREFIX):
            path = Path(name_or_path[len(SCRIPTED_PREFIX) :]).expanduser().absolute()
            if not path.is_file():
                raise InvalidModelFileError(f"scripted model: file not found: {path}")
            return ModelSpec(name=f"scripted-{path.stem}", source=ScriptedReplies(path=str(path)),
                             keep_alive_s=self._default_keep_alive(), kv_ram_bytes=self.memory.kv_ram_bytes,
                             kv_disk_bytes=self.memory.kv_disk_bytes)
        if "/" in name_or_path or name_or_path.endswith(".gguf"):
            path = Path(name_or_path).expanduser().absolute()
            read_gguf_header(path)
            return ModelSpec(name=path.stem, source=LocalPath(path=str(path)),
                             keep_alive_s=self._default_keep_alive(), kv_ram_bytes=self.memory.kv_ram_bytes,
                             kv_disk_bytes=self.memory.kv_disk_bytes)
        raise UnknownModelError(
            f"unknown model {name_or_path!r}; known models: {', '.join(self.names())} "
            "(or give the path of a .gguf file, or scripted:FILE for canned replies)"
        )

    def _default_keep_alive(self) -> float:
        return DEFAULT_KEEP_ALIVE_S if self.memory.keep_alive_s is None else self.memory.keep_alive_s


def _read_layer(file: str, text: str, *, user: bool) -> _Layer:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{file}: invalid TOML: {exc}") from exc
    if not user:
        unknown = sorted(set(doc) - {"default", "models"})
        if unknown:
            raise RegistryError(f"{file}: unknown top-level key {unknown[0]!r}")
    memory = _memory(file, text, doc["memory"]) if user and "memory" in doc else None
    default = doc.get("default")
    if default is not None and not isinstance(default, str):
        raise RegistryError(f"{_where(file, text, (), 'default')}: default: expected a model name (a string)")
    models = doc.get("models", {})
    if not isinstance(models, dict):
        where = _where(file, text, (), "models")
        raise RegistryError(f"{where}: models: expected a table of [models.<name>]")
    entries = {name: _entry(file, text, name, raw) for name, raw in models.items()}
    return _Layer(file=file, text=text, default=default, entries=entries, memory=memory)


def _memory(file: str, text: str, raw: Any) -> MemorySettings:
    if not isinstance(raw, dict):
        raise RegistryError(f"{_where(file, text, (), 'memory')}: memory: expected a table [memory]")
    known = ("budget", "keep_alive", "kv_ram", "kv_disk")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = _where(file, text, ("memory",), unknown[0])
        raise RegistryError(f"{where}: memory.{unknown[0]}: unknown key (known: {', '.join(known)})")
    kv_caps: dict[str, int] = {}
    for key in ("kv_ram", "kv_disk"):
        if key in raw:
            try:
                kv_caps[key] = 0 if raw[key] in (0, "0") else parse_size(raw[key])
            except ValueError as exc:
                raise RegistryError(f"{_where(file, text, ('memory',), key)}: memory.{key}: {exc}") from exc
    budget = keep_alive = None
    try:
        if "budget" in raw:
            budget = parse_budget(raw["budget"])
    except ValueError as exc:
        raise RegistryError(f"{_where(file, text, ('memory',), 'budget')}: memory.budget: {exc}") from exc
    try:
        if "keep_alive" in raw:
            keep_alive = parse_duration(raw["keep_alive"])
    except ValueError as exc:
        where = _where(file, text, ("memory",), "keep_alive")
        raise RegistryError(f"{where}: memory.keep_alive: {exc}") from exc
    return MemorySettings(budget=budget, keep_alive_s=keep_alive, kv_ram_bytes=kv_caps.get("kv_ram"),
                          kv_disk_bytes=kv_caps.get("kv_disk"))


def _entry(file: str, text: str, name: str, raw: Any) -> _Entry:
    if not _NAME.match(name) or name.endswith(".gguf"):
        raise RegistryError(
            f"{_where(file, text, ('models', name), None)}: models.{name}: a model name is letters, digits "
            "and . _ : + - (starting with a letter or digit), and must not end in .gguf"
        )
    try:
        entry = msgspec.convert(raw, type=_Entry)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.n_ctx`".
        detail, _, at = str(exc).partition(" - at `$")
        at = at.rstrip("`")
        unknown = re.search(r"unknown field `(.+?)`", detail)
        if unknown:
            at = f"{at}.{unknown.group(1)}"
        leaf = re.split(r"[.\[]", at.lstrip("."))[0] or None
        where = _where(file, text, ("models", name), leaf)
        raise RegistryError(f"{where}: models.{name}{at}: {detail}") from exc
    if not isinstance(entry.keep_alive, UnsetType):
        try:
            parse_duration(entry.keep_alive)
        except ValueError as exc:
            where = _where(file, text, ("models", name), "keep_alive")
            raise RegistryError(f"{where}: models.{name}.keep_alive: {exc}") from exc
    if not isinstance(entry.api_key, UnsetType):
        where = _where(file, text, ("models", name), "api_key")
        raise RegistryError(f"{where}: models.{name}.api_key: an API key does not belong in config.toml; "
                            "put it in an environment variable named by `api_key_env`, or in a file of mode 0600 "
                            "named by `api_key_file`")  # fmt: skip
    for key in ("connect_timeout", "idle_timeout"):
        value = getattr(entry, key)
        if isinstance(value, UnsetType):
            continue
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise RegistryError(f"{_where(file, text, ('models', name), key)}: models.{name}.{key}: {exc}") from exc
        if seconds <= 0:
            raise RegistryError(f"{_where(file, text, ('models', name), key)}: models.{name}.{key}: must be positive")
    for key in ("path", "vocab", "api_key_file"):
        if isinstance(value := getattr(entry, key), str):
            path = Path(value).expanduser()
            # Relative paths are relative to the file that names them, not to the cwd.
            resolved = path if path.is_absolute() else Path(file).parent / path
            entry = msgspec.structs.replace(entry, **{key: str(resolved)})
    return entry


def _merge(layers: list[_Layer]) -> ModelRegistry:
    entries: dict[str, _Entry] = {}
    origin: dict[str, _Layer] = {}
    default: tuple[str, _Layer] | None = None
    memory = next((layer.memory for layer in reversed(layers) if layer.memory is not None), MemorySettings())
    for layer in layers:
        for name, entry in layer.entries.items():
            entries[name] = _overlay(entries.get(name), entry)
            origin[name] = layer
        if layer.default is not None:
            default = (layer.default, layer)
    specs = {name: _spec(name, entry, origin[name], memory) for name, entry in entries.items()}
    if default is None:
        raise RegistryError(f"{layers[0].file}: no `default` model is set")
    name, layer = default
    if name not in specs:
        raise RegistryError(
            f"{_where(layer.file, layer.text, (), 'default')}: default = {name!r} names no model; "
            f"known models: {', '.join(sorted(specs))}"
        )
    return ModelRegistry(specs, name, memory)


def _overlay(base: _Entry | None, top: _Entry) -> _Entry:
    if base is None:
        return top
    changes = {f: v for f in top.__struct_fields__ if (v := getattr(top, f)) is not UNSET}
    if "source" in changes or "path" in changes or "engine" in changes:
        unset = dict.fromkeys(("source", "path", *_REMOTE_KEYS), UNSET)
        base = msgspec.structs.replace(base, **unset)
    return msgspec.structs.replace(base, **changes)


def _spec(name: str, entry: _Entry, layer: _Layer, memory: MemorySettings) -> ModelSpec:
    where = _where(layer.file, layer.text, ("models", name), None)
    source: ModelSource | RemoteEndpoint
    remote = entry.remote_keys()
    if remote and isinstance(entry.engine, UnsetType):
        raise RegistryError(f"{where}: models.{name}: {', '.join(remote)} belong to a remote model: "
                            f"add engine = \"llama-server\", \"openai\" or \"ollama\"")  # fmt: skip
    if not isinstance(entry.engine, UnsetType):
        return _remote_spec(name, entry, where, memory)
    if not isinstance(entry.source, UnsetType) and not isinstance(entry.path, UnsetType):
        raise RegistryError(f"{where}: models.{name}: give `source` or `path`, not both")
    if not isinstance(entry.source, UnsetType):
        source = entry.source
    elif not isinstance(entry.path, UnsetType):
        source = LocalPath(path=entry.path)
    else:
        raise RegistryError(f"{where}: models.{name}: no `source` or `path` says where its GGUF is")
    flash_attn = True if isinstance(entry.flash_attn, UnsetType) else entry.flash_attn
    kv_cache_type = KvCacheType.F16 if isinstance(entry.kv_cache_type, UnsetType) else entry.kv_cache_type
    if kv_cache_type is not KvCacheType.F16 and not flash_attn:
        raise RegistryError(f"{where}: models.{name}: kv_cache_type {kv_cache_type.value!r} needs flash_attn "
                            "(llama.cpp stores V quantized only with flash attention); drop one of the two")
    return ModelSpec(
        name=name,
        source=source,
        n_ctx=DEFAULT_N_CTX if entry.n_ctx is UNSET else entry.n_ctx,
        threads=None if entry.threads is UNSET else entry.threads,
        flash_attn=flash_attn,
        kv_cache_type=kv_cache_type,
        parallel=1 if isinstance(entry.parallel, UnsetType) else entry.parallel,
        template=None if entry.template is UNSET else entry.template,
        description="" if entry.description is UNSET else entry.description,
        keep_alive_s=(
            parse_duration(entry.keep_alive) if not isinstance(entry.keep_alive, UnsetType)
            else DEFAULT_KEEP_ALIVE_S if memory.keep_alive_s is None else memory.keep_alive_s
        ),
        kv_ram_bytes=memory.kv_ram_bytes,
        kv_disk_bytes=memory.kv_disk_bytes,
    )


def _remote_spec(name: str, entry: _Entry, where: str, memory: MemorySettings) -> ModelSpec:
    """A model a remote engine serves: `engine` and `url`, and what the worker that talks to it needs."""
    if not isinstance(entry.source, UnsetType) or not isinstance(entry.path, UnsetType):
        raise RegistryError(f"{where}: models.{name}: a remote model (engine) has no `source` or `path`")
    if isinstance(entry.url, UnsetType) == isinstance(entry.urls, UnsetType):
        raise RegistryError(f"{where}: models.{name}: a remote model needs `url`, the server's base address "
                            "(e.g. \"http://gpu-box:8080\"), or `urls`, a list of servers of the same model; "
                            "one of the two")  # fmt: skip
    if isinstance(entry.urls, list) and (not entry.urls or len(set(entry.urls)) != len(entry.urls)):
        raise RegistryError(f"{where}: models.{name}.urls: a list of different servers, at least one")
    if not isinstance(entry.api_key_env, UnsetType) and not isinstance(entry.api_key_file, UnsetType):
        raise RegistryError(f"{where}: models.{name}: give `api_key_env` or `api_key_file`, not both")
    fields = {key: getattr(entry, key) for key in ("engine", "url", "model", "api_key_env", "api_key_file", "mode")
              if getattr(entry, key) is not UNSET}  # fmt: skip
    if isinstance(entry.urls, list):
        fields["url"], fields["urls"] = entry.urls[0], entry.urls
    for key in ("connect_timeout", "idle_timeout"):
        if not isinstance(value := getattr(entry, key), UnsetType):
            fields[f"{key}_s"] = parse_duration(value)
    try:
        endpoint = msgspec.convert(fields, type=RemoteEndpoint)
    except msgspec.ValidationError as exc:
        detail, _, at = str(exc).partition(" - at `$")
        key = at.rstrip("`").lstrip(".").removesuffix("_s") or ("urls" if isinstance(entry.urls, list) else "url")
        hint = " (http:// or https://, a host, an optional path)" if key.startswith("url") else ""
        raise RegistryError(f"{where}: models.{name}.{key}: {detail}{hint}") from exc
    if endpoint.engine is RemoteEngine.OLLAMA and not endpoint.model:
        raise RegistryError(f"{where}: models.{name}: an Ollama model needs `model`, the name `ollama list` shows")
    return ModelSpec(
        name=name,
        source=endpoint,
        n_ctx=0 if isinstance(entry.n_ctx, UnsetType) else entry.n_ctx,
        threads=1,  # the worker only streams; the remote does the computing
        parallel=REMOTE_PARALLEL if isinstance(entry.parallel, UnsetType) else entry.parallel,
        template=None if entry.template is UNSET else entry.template,
        description="" if entry.description is UNSET else entry.description,
        keep_alive_s=(
            parse_duration(entry.keep_alive) if not isinstance(entry.keep_alive, UnsetType)
            else DEFAULT_KEEP_ALIVE_S if memory.keep_alive_s is None else memory.keep_alive_s
        ),
        vocab=None if isinstance(entry.vocab, UnsetType) else entry.vocab,
    )


def remote_models(registry: ModelRegistry) -> list[tuple[str, RemoteEndpoint, int]]:
    """(name, endpoint, n_ctx) of each model a remote engine serves."""
    return [(spec.name, spec.source, spec.n_ctx) for spec in registry.specs() if isinstance(spec.source, RemoteEndpoint)]


def _where(file: str, text: str, table: tuple[str, ...], key: str | None) -> str:
    """`file:line` for a key, best effort (tomllib keeps no positions after parsing)."""
    line = _line_of(text, table, key)
    return f"{file}:{line}" if line else file


def _line_of(text: str, table: tuple[str, ...], key: str | None) -> int | None:
    """The line assigning `key` in `[table]` (top level if `table` is empty), else the table's header."""
    lines = text.splitlines()
    start, header_line = 0, None
    if table:
        parts = r"\s*\.\s*".join(rf"[\"']?{re.escape(p)}[\"']?" for p in table)
        header = re.compile(rf"^\s*\[\s*{parts}\s*[\].]")
        found = next((i for i, line in enumerate(lines) if header.match(line)), None)
        if found is None:
            return None
        start, header_line = found + 1, found + 1
    if key is not None:
        assignment = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for i in range(start, len(lines)):
            if lines[i].lstrip().startswith("["):
                break  # the next table: the key was not set in this one
            if assignment.match(lines[i]):
                return i + 1
    return header_line


class RegistryWatcher:
    """The registry as of the user's config file's last change.

    The supervisor is long-lived and started implicitly by the CLI, so an edit
    to config.toml must take effect on the next request, and a broken edit must
    fail that request with the file and line, not the daemon. A failed reload
    keeps no stamp, so every request retries until the file is fixed."""

    def __init__(self, layout: HomeLayout) -> None:
        self._layout = layout
        self._stamp: tuple[int, int, int] | None = None
        self._registry: ModelRegistry | None = None
        self._last_memory = MemorySettings()

    def current(self) -> ModelRegistry:
        stamp = self._config_stamp()
        if self._registry is None or stamp != self._stamp:
            self._registry = None
            self._registry = ModelRegistry.load(self._layout)
            self._stamp = stamp
        return self._registry

    def memory_settings(self) -> MemorySettings:
        """`[memory]` as of now; while config.toml is broken, as it last read (the error
        reaches every request that looks a model up, so a budget must not fail too)."""
        try:
            self._last_memory = self.current().memory
        except RegistryError:
            pass
        return self._last_memory

    def _config_stamp(self) -> tuple[int, int, int]:
        try:
            stat = self._layout.config_file.stat()
        except OSError:
            return (0, 0, 0)
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

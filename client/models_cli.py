"""`bastion models add`: write a remote model's `[models.NAME]` table into config.toml.

The supervisor reads config.toml again when it changes, so the model can be used at once;
`bastion doctor` tries it. The table is appended as text (the rest of the file, comments
included, stays as it was); a name the file already has is refused rather than rewritten.
No API key is ever written: only where it is (`--api-key-env`, `--api-key-file`).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from bastion.client import render
from bastion.client.command_io import EXIT_FAILURE, EXIT_USAGE
from bastion.protocol import MAX_PARALLEL, HomeLayout
from bastion.protocol.remote import RemoteEndpoint, RemoteEngine, RemoteMode

models_app = typer.Typer(help="The models config.toml names.", no_args_is_help=True, rich_markup_mode=None)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")


@models_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The name runs will use (--model NAME).")],
    url: Annotated[str, typer.Option("--url", help="The server's base address, e.g. http://gpu-box:8080.")],
    engine: Annotated[RemoteEngine, typer.Option("--engine", help="What the server speaks.")] = (
        RemoteEngine.LLAMA_SERVER),
    model: Annotated[str, typer.Option("--model", help="The server's name for the model (Ollama: required).")] = "",
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="The environment variable holding its API key.")] = "",
    api_key_file: Annotated[str, typer.Option("--api-key-file", help="A file of mode 0600 holding its API key.")] = "",
    mode: Annotated[RemoteMode, typer.Option("--mode", help="completion: bastion formats the prompt; chat: the "
                                             "server does (for servers that take only messages).")] = (
        RemoteMode.COMPLETION),
    n_ctx: Annotated[int | None, typer.Option("--n-ctx", min=16,
                                              help="Context per request (default: the server's own).")] = None,
    parallel: Annotated[int | None, typer.Option("--parallel", min=1, max=MAX_PARALLEL,
                                                 help="Requests in flight to it at once (default 4).")] = None,
) -> None:
    """Add a model that a remote engine serves (llama.cpp's server, an OpenAI-compatible server, Ollama)."""
    if not _NAME.match(name) or name.endswith(".gguf"):
        render.error(f"{name!r}: a model name is letters, digits and . _ : + - (starting with a letter or digit)")
        raise typer.Exit(EXIT_USAGE)
    key_file = str(Path(api_key_file).expanduser().absolute()) if api_key_file else ""
    fields = {"engine": engine.value, "url": url, "model": model, "api_key_env": api_key_env,
              "api_key_file": key_file, "mode": "" if mode is RemoteMode.COMPLETION else mode.value}  # fmt: skip
    try:
        msgspec.convert({k: v for k, v in fields.items() if v}, type=RemoteEndpoint)
    except msgspec.ValidationError as exc:
        render.error(f"{exc} (a url is http:// or https://, a host, an optional path)")
        raise typer.Exit(EXIT_USAGE) from None
    if api_key_env and api_key_file:
        render.error("give --api-key-env or --api-key-file, not both")
        raise typer.Exit(EXIT_USAGE)
    if engine is RemoteEngine.OLLAMA and not model:
        render.error("an Ollama model needs --model, the name `ollama list` shows on that machine")
        raise typer.Exit(EXIT_USAGE)
    config = HomeLayout.from_env().config_file
    try:
        text = config.read_text(encoding="utf-8") if config.exists() else ""
        existing = tomllib.loads(text).get("models", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        render.error(f"{config}: cannot read it: {exc}; fix it first")
        raise typer.Exit(EXIT_FAILURE) from None
    if name in existing:
        render.error(f"{config} already has [models.{name}]: edit it there, or pick another name")
        raise typer.Exit(EXIT_USAGE)
    lines = [f'[models.{_key(name)}]'] + [f"{key} = {_string(value)}" for key, value in fields.items() if value]
    lines += [f"{key} = {value}" for key, value in (("n_ctx", n_ctx), ("parallel", parallel)) if value is not None]
    table = "\n".join(lines) + "\n"
    try:
        tomllib.loads(table)
    except tomllib.TOMLDecodeError as exc:
        render.error(f"these values do not make a TOML table ({exc}); no control characters, please")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        config.parent.mkdir(parents=True, exist_ok=True)
        with open(config, "a", encoding="utf-8") as f:
            f.write(("\n" if text and not text.endswith("\n\n") else "") + table)
    except OSError as exc:
        render.error(f"cannot write {config}: {exc.strerror}")
        raise typer.Exit(EXIT_FAILURE) from None
    print(f"added to {config}:\n\n{table}\ntry it: bastion doctor; use it: bastion run --model {name} \"Hello\"")


def _string(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _string(name)

"""Request bodies as both APIs share them: lenient models, bounded numbers, one way to parse.

`Lenient` is the base of every body model: fields it does not know are
ignored, as llama.cpp's server and vLLM do. The bounded types keep every
number a client sends within what the wire and the worker take (a seed past
64 bits is a 400, not a crash). `parse_body` turns a validation error into a
400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.gateway.errors import ApiError
from bastion.protocol.common import MAX_TOP_LOGPROBS
from bastion.protocol.completion import FunctionTool

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
TokenCount = Annotated[int, Field(ge=1, le=1_000_000)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TopK = Annotated[int, Field(ge=0, le=1_000_000)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(Lenient):
    name: FunctionName
    description: str = ""
    parameters: dict[str, Any] = {}


class ToolIn(Lenient):
    """A tool the client offers: the same shape in OpenAI's and Ollama's requests."""

    type: Literal["function"] = "function"
    function: FunctionDef


def function_tools(tools: list[ToolIn] | None) -> tuple[FunctionTool, ...]:
    return tuple(FunctionTool(name=t.function.name, description=t.function.description,
                              parameters=t.function.parameters) for t in tools or ())  # fmt: skip


def parse_body(model: type[BaseModel], body: object) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from exc

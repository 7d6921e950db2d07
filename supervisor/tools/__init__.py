"""Which tools exist, how a model is told about them, and how its calls are read.

registry.py   ToolSpec, ToolRegistry, the built-ins (clock, calculator), advertise
sandboxed.py  the tools that run in the sandbox, as the model and the policy see them
calls.py      parse_tool_calls: the call formats every model family writes, and repair_hint
  call_scan.py     the left-to-right walk of a reply: markers, fences, bare JSON, prose
  call_regions.py  the contract between the scan and the readers of marked regions
  call_shapes.py   findings, JSON call shapes, named arguments, Python-style calls
  native_tags.py   calls between a family's own tags (<tool_call>, <|python_tag|>, ...)
  native_named.py  calls named outside their JSON (Mistral, DeepSeek, Kimi, harmony, Functionary)
  xml_calls.py     calls with text-valued parameters (Qwen3-Coder, Seed-OSS, GLM, MiniMax)
  typed_values.py  text argument values typed by the tool's schema
  tool_index.py    the run's tools as the parser asks about them
  text_scan.py     forward-only search that keeps parsing linear
reasoning.py  split_reasoning, ReasoningSplitter: reasoning apart from the answer, whole or streamed
  harmony.py       GPT-OSS harmony channels
near_json.py  JSON as small models write it, strictly first, then repaired
schema.py     the JSON-schema subset tools are described with, and validation
"""

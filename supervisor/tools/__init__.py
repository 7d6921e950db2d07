"""Which tools exist, how a model is told about them, and how its calls are read.

    registry.py   ToolSpec, ToolRegistry, the built-ins (clock, calculator), advertise
    sandboxed.py  the tools that run in the sandbox, as the model and the policy see them
    calls.py      parse_tool_calls: the call formats small models write
    near_json.py  JSON as small models write it, strictly first, then repaired
    schema.py     the JSON-schema subset tools are described with, and validation
"""

"""Turning a conversation into the prompt text a model expects.

    formatter.py  ChatMessage, PromptFormatter: the GGUF's template or a built-in, rendered in a sandbox
    builtin/      the built-in chat templates (a module per family), their departures from the
                  official templates, and the evidence that picks one
"""

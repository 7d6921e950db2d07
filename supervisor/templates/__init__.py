"""Turning a conversation into the prompt text a model expects.

    formatter.py  ChatMessage, PromptFormatter: the GGUF's template or a built-in, rendered in a sandbox
    builtin.py    the built-in chat templates and the evidence that picks one
"""

"""The agent loop and what it works on; no processes and no sockets of its own.

    loop.py          format → generate → parse → gate → execute → append → again
    context.py       which messages fit the next prompt (pure)
    conversation.py  the stored or one-shot conversation a run reads and appends to
"""

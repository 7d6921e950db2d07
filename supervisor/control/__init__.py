"""Answers to client requests, one module per family of requests.

    runs.py      `run`: resolve the session and model, then drive the agent loop
    trust.py     tools list/run, policy show/check, approvals, audit, doctor

Each answers typed requests with typed events; `core.py` routes them here.
"""

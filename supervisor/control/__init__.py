"""Answers to client requests, one module per family of requests.

    runs.py      `run`: resolve the session, tools and model, then drive the agent loop
    completions.py  `complete`: one model call over a conversation an API client holds
    model_access.py what runs and completions need of a model: loaded, its counter, its template
    sessions.py  list, show, fork, clear, pin, delete sessions
    models.py    load, unload, list models; the supervisor's status
    trust.py     tools list/run, policy show/check, approvals, audit, doctor

Each answers typed requests with typed events; `core.py` routes them here.
"""

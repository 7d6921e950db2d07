"""Models served by a remote engine over HTTP: its API as data (dialects.py) and the core that streams it (core.py)."""

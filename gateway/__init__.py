"""bastion's HTTP gateway: OpenAI- and Ollama-compatible APIs over the supervisor.

A client of the supervisor like the CLI: it speaks HTTP to the world and the
control protocol to the supervisor, and imports only `protocol/`. Untrusted
HTTP is parsed here, never in the supervisor.

    __main__.py     the process: arguments, the API key rule, uvicorn
    app.py          the Starlette app: routes, authentication, errors, health, metrics
    service.py      what routes share: settings, the link, body limits, streaming or collected answers
    openai_api.py   /v1/chat/completions, /v1/completions, /v1/models: bodies, chunks, responses
    ollama_api.py   /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version
    exchange.py     one streaming request to the supervisor, as a route follows it
    link.py         the one control connection every request shares
    errors.py       supervisor errors as HTTP statuses and API error bodies
    metrics.py      Prometheus text for /metrics
"""

"""The agent loop and what it works on; no processes and no sockets of its own.

    loop.py            format → generate → parse → gate → execute → append → again
    model_calls.py     one generation on the model's worker: retry after a worker death, cancel
    prompt_builder.py  the next prompt: context planning, summaries, the system message
    tool_round.py      parse a reply's calls, run them through tool_execution, append the results
    tool_execution.py  gate → sandbox → audit, for runs and for `tools run`
    constraints.py     which grammar a model call samples under (tool choice)
    completion.py      the one model call of an API client's `complete`
    context.py         which messages fit the next prompt (pure)
    conversation.py    the stored or one-shot conversation a run reads and appends to
"""

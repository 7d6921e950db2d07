"""Which models exist, which are loaded, and keeping them loaded.

    registry.py       model names → specs (bundled configs/models.toml + the user's config.toml)
    sources.py        where a spec's GGUF comes from (package, chunks, path), assembled and verified
    gguf_metadata.py  a GGUF's metadata read in pure Python
    memory.py         memory estimates, the budget, what to unload to make room
    residency.py      keep_alive and admission: when an idle model is unloaded
    usage.py          one loaded model's use record
    loaded.py         LoadedModels: loading, reloading, crash restarts, status
    worker_slot.py    a loaded model's worker across restarts, as runs see it
    restarts.py       when a crashed worker is restarted, when the model is failed (pure)
    tokenizer.py      vocabulary-only token counting (the one llama_cpp import here)
"""

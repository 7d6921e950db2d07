"""The memory budget, LRU unloading and keep_alive: in-process with stand-in
workers (deterministic timing), then end to end through the real CLI,
supervisor and worker processes (scripted models; SmolLM2 for a busy one).

Waits are on observable conditions (`bastion ps --json`, the model table)
with a deadline, never a bare sleep that hopes something happened.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from bastion.protocol import HomeLayout, KvCacheType
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.errors import InsufficientMemoryError, ModelBusyError, RegistryError
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.loaded_model import status_of
from bastion.supervisor.models.memory import SCRIPTED_BYTES, BudgetSetting
from bastion.supervisor.models.registry import DEFAULT_KEEP_ALIVE_S, MemorySettings, ModelRegistry, ModelSpec
from bastion.supervisor.models.sources import ScriptedReplies
from tests.e2e_support import Bastion, events_of, start_streaming
from tests.manual_clock import ManualClock
from tests.standin_pool import StandInPool
from tests.waiting import until, wait_until

MiB = 1 << 20

# --- in-process: LoadedModels with stand-in workers -------------------------------

InstantPool = StandInPool


def spec(tmp_path: Path, name: str, **fields: object) -> ModelSpec:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(["hello"]))
    return ModelSpec(**{"name": name, "source": ScriptedReplies(path=str(path)), "n_ctx": 256, "threads": 1,
                        **fields})


class Budget:
    """What config.toml's [memory] budget says; a test may change it between requests."""

    def __init__(self, mib: int) -> None:
        self.mib = mib

    def settings(self) -> MemorySettings:
        return MemorySettings(budget=BudgetSetting(bytes=self.mib * MiB))


def models_with(tmp_path: Path, *, budget: Budget | None = None,
                clock: ManualClock | None = None) -> tuple[LoadedModels, InstantPool]:
    config = SupervisorConfig(memory_available_bytes=64 << 30)
    pool = InstantPool(config)
    models = LoadedModels(config=config, layout=HomeLayout(tmp_path / "home"), pool=pool,  # type: ignore[arg-type]
                          memory_settings=(budget or Budget(10_000)).settings, clock=clock)
    return models, pool


def nothing(*_: object) -> None:
    return None


def test_the_same_settings_never_load_twice(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, pool = models_with(tmp_path)
        first, already = await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        again, already_again = await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        assert (already, already_again) == (False, True) and again is first and len(pool.started) == 1

    asyncio.run(scenario())


def test_a_new_n_ctx_replaces_an_idle_worker_and_says_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, pool = models_with(tmp_path)
        first, _ = await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        second, already = await models.ensure_loaded(spec(tmp_path, "a", n_ctx=512), nothing)
        assert not already and second.handle is not first.handle and first.handle.exited.done()
        assert second.reload_reason == "n_ctx 256 → 512" and second.handle.n_ctx == 512

    asyncio.run(scenario())


def test_turning_flash_attention_off_replaces_the_worker_with_one_started_without_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, pool = models_with(tmp_path)
        first, _ = await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        assert first.handle.launch.flash_attn  # on unless the model's entry says otherwise
        second, already = await models.ensure_loaded(spec(tmp_path, "a", flash_attn=False), nothing)
        assert not already and first.handle.exited.done() and second.reload_reason == "flash_attn true → false"
        assert pool.started[-1].launch.flash_attn is False
        third, _ = await models.ensure_loaded(spec(tmp_path, "a", kv_cache_type=KvCacheType.Q8_0), nothing)
        assert third.reload_reason == "flash_attn false → true, kv_cache_type f16 → q8_0"
        fourth, _ = await models.ensure_loaded(spec(tmp_path, "a", kv_cache_type=KvCacheType.Q8_0, parallel=4),
                                               nothing)
        assert fourth.reload_reason == "parallel 1 → 4" and pool.started[-1].launch.parallel == 4

    asyncio.run(scenario())


def test_a_new_n_ctx_for_a_model_in_use_is_refused_as_busy(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, _ = models_with(tmp_path)
        run_ends: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        model, _ = await models.ensure_loaded(spec(tmp_path, "a"), nothing, until=run_ends)
        with pytest.raises(ModelBusyError, match=r"n_ctx 256 → 512.*retry once it is idle"):
            await models.ensure_loaded(spec(tmp_path, "a", n_ctx=512), nothing)
        assert not model.handle.exited.done()

    asyncio.run(scenario())


def test_a_new_template_applies_without_a_new_worker(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, pool = models_with(tmp_path)
        first, _ = await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        again, already = await models.ensure_loaded(spec(tmp_path, "a", template="chatml"), nothing)
        assert already and again.handle is first.handle and len(pool.started) == 1
        assert "chatml" in again.formatter.source

    asyncio.run(scenario())


def test_loading_past_the_budget_unloads_the_least_recently_used_idle_model(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, pool = models_with(tmp_path, budget=Budget(SCRIPTED_BYTES * 2 // MiB + 8))  # room for two
        await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        await models.ensure_loaded(spec(tmp_path, "b"), nothing)
        await models.ensure_loaded(spec(tmp_path, "a"), nothing)  # a is now the more recent
        await models.ensure_loaded(spec(tmp_path, "c"), nothing)
        assert pool.alive_names() == {"a", "c"} and models.names() == ["a", "c"]
        assert models.memory_held() == {"a": SCRIPTED_BYTES, "c": SCRIPTED_BYTES}

    asyncio.run(scenario())


def test_a_model_in_use_or_generating_is_never_unloaded_for_another(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, pool = models_with(tmp_path, budget=Budget(SCRIPTED_BYTES // MiB + 8))  # room for one
        run_ends: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await models.ensure_loaded(spec(tmp_path, "a"), nothing, until=run_ends)
        with pytest.raises(InsufficientMemoryError, match=r"models in use or loading hold the rest \(a 32 MiB\)"):
            await models.ensure_loaded(spec(tmp_path, "b"), nothing)
        assert pool.alive_names() == {"a"}
        run_ends.set_result(None)
        await until(lambda: models.get("a").usage.users == 0)  # type: ignore[union-attr]
        # No request holds it now, but its worker is still generating (e.g. a cancelled run's reply).
        handle = models.get("a").handle  # type: ignore[union-attr]
        handle.running["busy"] = object()  # type: ignore[assignment]
        with pytest.raises(InsufficientMemoryError):
            await models.ensure_loaded(spec(tmp_path, "b"), nothing)
        handle.running.clear()
        await models.ensure_loaded(spec(tmp_path, "b"), nothing)
        assert pool.alive_names() == {"b"}

    asyncio.run(scenario())


def test_a_model_bigger_than_the_budget_fails_without_unloading_anything(tmp_path: Path) -> None:
    async def scenario() -> None:
        budget = Budget(SCRIPTED_BYTES // MiB + 8)
        models, pool = models_with(tmp_path, budget=budget)
        await models.ensure_loaded(spec(tmp_path, "a"), nothing)
        budget.mib = 16  # config.toml edited
        with pytest.raises(InsufficientMemoryError, match="more than the whole memory budget of 16 MiB"):
            await models.ensure_loaded(spec(tmp_path, "b"), nothing)
        assert pool.alive_names() == {"a"}

    asyncio.run(scenario())


def test_keep_alive_zero_unloads_once_the_request_ends_and_not_before(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        models, pool = models_with(tmp_path, clock=clock)
        run_ends: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await models.ensure_loaded(spec(tmp_path, "a"), nothing, keep_alive_s=0, until=run_ends)
        assert clock.pending() == []  # in use: no countdown at all
        (status,) = models.statuses()
        assert status.keep_alive_s == 0 and status.expires_in_s is None
        run_ends.set_result(None)
        await until(lambda: clock.pending() == [0.0], what="the expiry armed when the run ended")
        clock.advance(0)
        await until(lambda: not pool.alive_names(), what="the model unloaded")
        assert models.names() == []

    asyncio.run(scenario())


def test_keep_alive_counts_from_the_last_request_and_minus_one_means_never(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        models, pool = models_with(tmp_path, clock=clock)
        await models.ensure_loaded(spec(tmp_path, "short"), nothing, keep_alive_s=30)
        await models.ensure_loaded(spec(tmp_path, "never"), nothing, keep_alive_s=-1)
        clock.advance(20)
        await models.ensure_loaded(spec(tmp_path, "short"), nothing)  # no keep_alive: the spec's...
        assert models.get("short").usage.keep_alive_s == DEFAULT_KEEP_ALIVE_S  # type: ignore[union-attr]
        await models.ensure_loaded(spec(tmp_path, "short"), nothing, keep_alive_s=30)  # ...or the request's
        clock.advance(29.9)  # 49.9 s after the first request, 29.9 s after the last: still loaded
        assert pool.alive_names() == {"short", "never"}
        assert clock.pending() == [pytest.approx(0.1)]  # one countdown (short's), due in 0.1 s
        clock.advance(0.2)  # the timer restarted at the last request
        await until(lambda: "short" not in pool.alive_names(), what="short unloaded")
        statuses = {s.name: s for s in models.statuses()}
        assert statuses["never"].keep_alive_s == -1 and statuses["never"].expires_in_s is None
        assert clock.pending() == []  # nothing will ever unload "never"
        assert pool.alive_names() == {"never"}

    asyncio.run(scenario())


def test_keep_alive_waits_while_the_worker_is_still_generating(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        models, pool = models_with(tmp_path, clock=clock)
        model, _ = await models.ensure_loaded(spec(tmp_path, "a"), nothing, keep_alive_s=5)
        model.handle.running["busy"] = object()  # type: ignore[assignment]
        clock.advance(60)  # long past keep_alive, but a generation is in flight
        assert pool.alive_names() == {"a"}
        assert clock.pending() == [pytest.approx(0.25)]  # it looks again shortly
        model.handle.running.clear()
        clock.advance(5)  # idle since the last check: keep_alive counts from there
        await until(lambda: not pool.alive_names(), what="the model unloaded")

    asyncio.run(scenario())


def test_status_reports_the_estimate_keep_alive_and_time_left(tmp_path: Path) -> None:
    async def scenario() -> None:
        models, _ = models_with(tmp_path)
        model, _ = await models.ensure_loaded(spec(tmp_path, "a"), nothing, keep_alive_s=60)
        status = status_of(model)
        assert status.memory_estimate_bytes == SCRIPTED_BYTES and status.keep_alive_s == 60
        assert status.expires_in_s is not None and 59 < status.expires_in_s <= 60
        budget = models.memory_budget()
        assert budget.bytes == 10_000 * MiB and budget.source.value == "config"

    asyncio.run(scenario())


# --- the registry's [memory] table and keep_alive per model ------------------------------


def registry_with(tmp_path: Path, text: str) -> ModelRegistry:
    layout = HomeLayout(tmp_path / "home")
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(text)
    return ModelRegistry.load(layout)


def test_memory_settings_and_per_model_keep_alive_come_from_config_toml(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, '[memory]\nbudget = "6GiB"\nkeep_alive = "10m"\n\n'
                                       '[models.smollm2-135m]\nkeep_alive = -1\n')
    assert registry.memory.budget == BudgetSetting(bytes=6 << 30) and registry.memory.keep_alive_s == 600
    assert registry.lookup("smollm2-135m").keep_alive_s == -1
    assert registry.lookup("gemma3-270m").keep_alive_s == 600  # the [memory] default
    script = tmp_path / "s.json"
    script.write_text('["x"]')
    assert registry.lookup(f"scripted:{script}").keep_alive_s == 600
    plain = registry_with(tmp_path, "")
    assert plain.lookup(None).keep_alive_s == DEFAULT_KEEP_ALIVE_S == 300
    assert registry_with(tmp_path, '[memory]\nbudget = "50%"\n').memory.budget == BudgetSetting(share=0.5)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[memory]\nbudget = "lots"\n', r"config\.toml:2: memory\.budget: expected a size"),
        ('[memory]\nkeep_alive = "soon"\n', r"config\.toml:2: memory\.keep_alive: expected a duration"),
        ("[memory]\nbugdet = 1\n", r"config\.toml:2: memory\.bugdet: unknown key"),
        ('\n[models.smollm2-135m]\nkeep_alive = "5 minutes"\n',
         r"config\.toml:3: models\.smollm2-135m\.keep_alive"),
        ("memory = 3\n", r"memory: expected a table"),
    ],
    ids=["budget", "keep_alive", "unknown_key", "model_keep_alive", "not_a_table"],
)
def test_bad_memory_settings_name_the_file_line_and_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(RegistryError, match=needle):
        registry_with(tmp_path, text)


# --- end to end through the CLI ------------------------------------------------------------


def scripted(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps([f"reply {i} from {name}" for i in range(20)]))
    return f"scripted:{path}"


def configure(bastion: Bastion, text: str) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(text)


def loaded(bastion: Bastion) -> dict[str, dict]:
    """What `bastion ps --json` lists, by name (asked over the test's own control connection)."""
    return {name: msgspec.to_builtins(status) for name, status in bastion.models().items()}


@pytest.mark.e2e
def test_a_budget_for_one_model_unloads_the_idle_one_to_load_another(bastion: Bastion, tmp_path: Path) -> None:
    configure(bastion, f'[memory]\nbudget = "{SCRIPTED_BYTES // MiB + 16}MiB"\n')
    assert bastion("load", scripted(tmp_path, "first")).returncode == 0
    first_pid = loaded(bastion)["scripted-first"]["pid"]
    done = bastion("load", scripted(tmp_path, "second"))
    assert done.returncode == 0, done.stderr
    assert list(loaded(bastion)) == ["scripted-second"]
    assert not any(p.pid == first_pid for p in bastion.processes())
    code, (status,) = bastion.json("status")
    assert status["memory_budget_bytes"] == SCRIPTED_BYTES + 16 * MiB and status["memory_budget_source"] == "config"
    assert status["memory_held_by"] == {"scripted-second": SCRIPTED_BYTES}
    text = bastion("status").stdout
    assert "memory:" in text and "scripted-second: 32 MiB" in text and "[memory] budget" in text


@pytest.mark.e2e
def test_a_budget_too_small_fails_with_insufficient_memory_and_says_what_to_do(bastion: Bastion,
                                                                               tmp_path: Path) -> None:
    configure(bastion, '[memory]\nbudget = "16MiB"\n')
    model = scripted(tmp_path, "big")
    code, lines = bastion.json("load", model)
    assert code == 1
    error = events_of(lines, "error")[0]
    assert error["code"] == "insufficient_memory"
    assert "32 MiB" in error["message"] and "16 MiB" in error["message"]
    done = bastion("run", "hi", "--model", model)
    assert done.returncode == 1 and "--memory-budget" in done.stderr and "[memory] budget" in done.stderr
    assert loaded(bastion) == {}


@pytest.mark.real_model
def test_a_model_busy_generating_is_never_unloaded_to_make_room(bastion: Bastion, tmp_path: Path) -> None:
    assert bastion("load", "smollm2-135m").returncode == 0
    smollm2 = loaded(bastion)["smollm2-135m"]
    # Room for SmolLM2 and not one scripted worker more (config.toml is read again per request).
    configure(bastion, f"[memory]\nbudget = {smollm2['memory_estimate_bytes'] + 16 * MiB}\n")
    process, events, first_token, reader = start_streaming(
        bastion, "Count slowly.", "--max-tokens", "1500", "--ignore-eos")
    assert first_token.wait(120)
    code, lines = bastion.json("load", scripted(tmp_path, "newcomer"))
    assert code == 1
    error = events_of(lines, "error")[0]
    assert error["code"] == "insufficient_memory" and "smollm2-135m" in error["message"]
    assert loaded(bastion)["smollm2-135m"]["pid"] == smollm2["pid"]
    process.send_signal(signal.SIGINT)  # cancel the run: the model goes idle
    assert process.wait(timeout=60) == 130
    reader.join(10)
    done = bastion("load", scripted(tmp_path, "newcomer"))
    assert done.returncode == 0, done.stderr
    assert list(loaded(bastion)) == ["scripted-newcomer"]


@pytest.mark.e2e
def test_keep_alive_zero_unloads_the_model_after_the_run(bastion: Bastion, tmp_path: Path) -> None:
    done = bastion("run", "hi", "--model", scripted(tmp_path, "once"), "--keep-alive", "0")
    assert done.returncode == 0 and done.stdout.strip() == "reply 0 from once"
    wait_until(lambda: loaded(bastion) == {}, what="the model unloaded")


@pytest.mark.e2e
def test_a_short_keep_alive_unloads_after_idling_for_it(bastion: Bastion, tmp_path: Path) -> None:
    model = scripted(tmp_path, "brief")
    started = time.monotonic()
    code, lines = bastion.json("load", model, "--keep-alive", "2s")
    (done,) = events_of(lines, "model_loaded")
    assert code == 0 and done["model"]["keep_alive_s"] == 2 and 0 < done["model"]["expires_in_s"] <= 2
    wait_until(lambda: "scripted-brief" not in loaded(bastion), what="the model unloaded")
    assert time.monotonic() - started >= 2  # not before its keep_alive ran out
    # A run without --keep-alive gets the model's configured keep_alive.
    assert bastion("run", "hi", "--model", model).returncode == 0
    assert loaded(bastion)["scripted-brief"]["keep_alive_s"] == DEFAULT_KEEP_ALIVE_S


@pytest.mark.e2e
def test_loading_with_the_same_settings_keeps_the_worker_and_a_new_n_ctx_replaces_it(bastion: Bastion,
                                                                                     tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(["ok"]))
    entry = f'[models.tiny]\nsource = {{ kind = "scripted", path = "{path}" }}\n'
    configure(bastion, entry + "n_ctx = 512\n")
    assert bastion("load", "tiny").returncode == 0
    pid = loaded(bastion)["tiny"]["pid"]
    again = bastion("load", "tiny")
    assert again.returncode == 0 and "already loaded" in again.stderr
    assert loaded(bastion)["tiny"]["pid"] == pid
    configure(bastion, entry + "n_ctx = 1024\n")
    code, lines = bastion.json("load", "tiny")
    (done,) = events_of(lines, "model_loaded")
    assert code == 0 and done["reload_reason"] == "n_ctx 512 → 1024" and not done["already_loaded"]
    assert done["model"]["pid"] != pid and done["model"]["n_ctx"] == 1024


@pytest.mark.e2e
def test_bad_keep_alive_flags_are_usage_errors(bastion: Bastion, tmp_path: Path) -> None:
    done = bastion("run", "hi", "--model", scripted(tmp_path, "x"), "--keep-alive", "soon")
    assert done.returncode == 2 and "--keep-alive" in done.stderr


@pytest.mark.e2e
def test_the_memory_budget_flag_wins_over_config_toml(bastion: Bastion, tmp_path: Path) -> None:
    configure(bastion, '[memory]\nbudget = "8GiB"\n')
    bad = subprocess.run([sys.executable, "-m", "bastion.supervisor", "--memory-budget", "plenty"], env=bastion.env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected a size" in bad.stderr
    with open(tmp_path / "supervisor.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "bastion.supervisor", "--memory-budget", "40MiB"],
                                   env=bastion.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: bastion("status").returncode == 0, what="the supervisor to start")
        code, (status,) = bastion.json("status")
        assert status["memory_budget_bytes"] == 40 * MiB and status["memory_budget_source"] == "flag"
        # Room for one scripted worker (32 MiB), as the flag says, not the 8 GiB config.toml asks for.
        assert bastion("load", scripted(tmp_path, "first")).returncode == 0
        assert bastion("load", scripted(tmp_path, "second")).returncode == 0
        assert list(loaded(bastion)) == ["scripted-second"]
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_the_gguf_a_load_resolves_is_announced_before_its_worker_starts(tmp_path: Path) -> None:
    """The daemon loads the file's vocabulary (for counting tokens) while the worker loads the model."""
    from bastion.supervisor.models.sources import LocalPath

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))

    async def scenario() -> tuple[list[tuple[Path, int]], int]:
        seen: list[tuple[Path, int]] = []  # the path, and how many workers had started by then
        config = SupervisorConfig(memory_available_bytes=64 << 30)
        pool = InstantPool(config)
        models = LoadedModels(config=config, layout=HomeLayout(tmp_path / "home"), pool=pool,  # type: ignore[arg-type]
                              memory_settings=Budget(10_000).settings,
                              on_resolved=lambda path: seen.append((path, len(pool.started))))
        await models.ensure_loaded(spec(tmp_path, "scripted"), nothing)  # a scripted model has no vocabulary
        await models.ensure_loaded(ModelSpec(name="local", source=LocalPath(path=str(gguf)), n_ctx=256, threads=1),
                                   nothing)  # fmt: skip
        return seen, len(pool.started)

    seen, started = asyncio.run(scenario())
    assert started == 2 and seen == [(gguf.resolve(), 1)]

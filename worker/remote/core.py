"""`RemoteCore`: what `WorkerCore` is for a local GGUF, for a model a remote
engine serves over HTTP (protocol/remote.py). The worker's process shell
drives both the same way (`start`, `step`, `active`), so a remote model has the
same restart, heartbeat, cancel and backpressure paths as a local one.

Each `Generate` becomes one streamed HTTP request, run as a task on an asyncio
loop of the core's own thread; what the task has to say (`TokenDelta`,
`RequestFailed`, `GenerationStats`, `GenerationFinished`) goes into a queue
that `step()` empties on the engine thread, and `wake` tells the shell there
is something to send. A cancel (passed on by `step()`, which the shell
wakes for it, and polled every `CANCEL_POLL_S` as well) cancels the task,
which closes the connection: llama.cpp's server, vLLM and Ollama all
stop generating for a client that went away.

What every `Generate` gets, in order (text held back by DELTA_INTERVAL_S is
sent before the failure that ends it):

    ran to an end   TokenDelta*  GenerationStats  GenerationFinished(stop|length|cancelled)
    failed          TokenDelta*  RequestFailed  GenerationStats  GenerationFinished(error)

Failures are classified (see ErrorCode):
    no connection before the first byte   one more try after RETRY_DELAY_S, then
                                          `remote_unreachable` (retryable)
    429 / 503                             retried after Retry-After when it is at
                                          most RETRY_AFTER_MAX_S, else retryable
    another error status, an `error` in   `remote_error`, the server's words quoted,
    the stream (or llama.cpp's SSE        no retry
    `error:` field), a line that is not
    JSON or longer than MAX_LINE_BYTES
    the stream cut, silent past the idle  `remote_interrupted`, the text before it
    timeout, or ended without its end     kept (the generation ends `error`)

llama.cpp's server: each session is pinned to the slot that served its first
reply (`id_slot`), so the server's own prompt cache for it stays warm.

Around it: dialects.py (each engine's requests and events, as data), http_stream.py (one
streamed request), replies.py (a reply's lines and error statuses, classified),
server_facts.py (the key, the server's description of the model, its token count) and
backends.py (which server serves which session).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgspec

from bastion.protocol import ErrorCode, RequestFailed, StopReason
from bastion.protocol.common import GrammarUse
from bastion.protocol.remote import BackendGauge, RemoteEndpoint, RemoteEngine, RemoteMode
from bastion.protocol.worker_wire import (
    CountTokens,
    FromWorker,
    Generate,
    ModelDescription,
    TokenCount,
)
from bastion.worker.core import Cancelled, Emit
from bastion.worker.engine import GrammarOutcome
from bastion.worker.link import refusal
from bastion.worker.remote.backends import REMEMBERED_SESSIONS, Backend, Backends
from bastion.worker.remote.dialects import (
    CompletionRequest,
    Event,
    Framing,
    MalformedEvent,
    calls_as_text,
    chat_request,
    completion_request,
    constrain,
    parse_chat_event,
    parse_event,
)
from bastion.worker.remote.http_stream import Cut, Idle, StreamResponse, Unreachable, post_stream
from bastion.worker.remote.replies import (
    END_OF_STREAM,
    ReplyFailure,
    line_payload,
    reply_lines,
    status_failure,
)
from bastion.worker.remote.server_facts import (
    NoTokenizer,
    RemoteUnavailable,
    count_at,
    model_description,
    reason,
    server_facts,
)
from bastion.worker.repetition import RepetitionGuard, keep_whole_words
from bastion.worker.run_report import Run, run_finished, run_stats, token_delta

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5
RETRY_DELAY_S = 0.5
RETRY_AFTER_MAX_S = 30.0
DELTA_INTERVAL_S = 0.05  # as WorkerCore: text at most every 50 ms, the first token at once
HEALTH_INTERVAL_S = 5.0


@dataclass(eq=False)
class _Generation:
    request: Generate
    emit: Emit
    cancelled: Cancelled
    run: Run
    held: str = ""
    last_emit: float = 0.0
    events: int = 0  # events that carried text
    end: StopReason | None = None  # how the server said the reply ended
    counted: bool = False  # whether the server said how many tokens the prompt had
    url: str = ""  # the server it is streaming from
    calls: dict[int, list[str]] = field(default_factory=dict)  # chat mode: [name, arguments] by index
    guard: RepetitionGuard | None = None  # sampling.loop_guard: a reply that keeps repeating itself is cut
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    cancel_sent: bool = False

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class RemoteCore:
    def __init__(self, endpoint: RemoteEndpoint, *, name: str, n_ctx: int, wake: Callable[[], None],
                 api_key: str = "") -> None:
        self._endpoint = endpoint
        self._name = name
        self._n_ctx = n_ctx
        self._wake = wake
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._api_key = api_key
        self._timeout = httpx.Timeout(endpoint.idle_timeout_s, connect=endpoint.connect_timeout_s)
        self._headers = headers
        self._out: queue.SimpleQueue[tuple[Emit, FromWorker] | _Generation] = queue.SimpleQueue()
        # (server, session) -> the llama-server slot holding it, least recently used first out
        self._slots: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._slots_busy: set[tuple[str, int]] = set()  # (server, slot) a request of ours was sent to and holds
        self._backends = Backends(endpoint.backends)
        self._gauges = self._backends.gauges()  # as of the last change, for the IO thread's heartbeats
        self._active = 0
        self._running: set[_Generation] = set()  # started, not yet ended (the engine thread's view)
        self.progress = 0
        self.kv_tokens = 0  # the remote holds the KV state
        self.snapshots = None
        self._loop = asyncio.new_event_loop()
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._thread = threading.Thread(target=self._loop.run_forever, name="remote-http", daemon=True)
        self._thread.start()
        if len(endpoint.backends) > 1:  # with one server there is nowhere to move its sessions to
            self._health = asyncio.run_coroutine_threadsafe(self._watch_health(), self._loop)

    # -- the shell's side (engine thread) ---------------------------------

    @property
    def active(self) -> int:
        return self._active

    @property
    def ready(self) -> bool:
        """Whether `step()` has something to send now."""
        return not self._out.empty()

    def start(self, request: Generate, emit: Emit, cancelled: Cancelled) -> None:
        generation = _Generation(request, emit, cancelled, Run(request=request, started=time.perf_counter()))
        if request.sampling.logprobs is not None:
            # Said, not silently dropped: the figures come from a model's logits, which stay on the server.
            for answer in refusal(request, ErrorCode.INVALID_REQUEST, "log-probabilities are not available from a "
                                  "remote model; ask without logprobs", 0):  # fmt: skip
                emit(answer)
            return
        self._active += 1
        self._running.add(generation)
        asyncio.run_coroutine_threadsafe(self._serve(generation), self._loop)

    def step(self) -> None:
        """Send what the streams queued, and pass on the cancels asked since the last step."""
        for generation in list(self._running):
            if not generation.cancel_sent and generation.cancelled():
                generation.cancel_sent = True
                self._loop.call_soon_threadsafe(generation.cancel)
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Generation):
                self._active -= 1
                self._running.discard(item)
            else:
                emit, message = item
                emit(message)

    def backend_gauges(self) -> tuple[BackendGauge, ...]:
        """Each server's state and figures (read from any thread)."""
        return self._gauges

    def count_tokens(self, request: CountTokens, emit: Emit) -> None:
        """Ask the server's own tokenizer (llama-server's and vLLM's `/tokenize`); TokenCount, or
        RequestFailed when it has none (Ollama) or cannot be reached."""
        asyncio.run_coroutine_threadsafe(self._count(request, emit), self._loop)

    def describe(self) -> ModelDescription:
        """What the remote serves, asked of it; RemoteUnavailable with what to do when it cannot say."""
        try:
            return asyncio.run_coroutine_threadsafe(self._describe(), self._loop).result()
        except RemoteUnavailable as exc:
            raise RemoteUnavailable(self.redacted(str(exc)), step=exc.step, fix=exc.fix) from None

    def redacted(self, text: str) -> str:
        """`text` without the API key (a server may echo the header it refused)."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def close(self) -> None:
        async def shut() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their connections close on the way out
            for client in self._clients.values():
                await client.aclose()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- the loop's side ---------------------------------------------------

    def _http(self, url: str) -> httpx.AsyncClient:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = httpx.AsyncClient(base_url=url.rstrip("/"), headers=self._headers,
                                                            timeout=self._timeout, follow_redirects=False)  # fmt: skip
        return client

    def _publish(self) -> None:
        self._gauges = self._backends.gauges()

    async def _count(self, request: CountTokens, emit: Emit) -> None:
        endpoint = self._endpoint
        backend = next((b for b in self._backends if b.healthy), None) or next(iter(self._backends))
        answer: FromWorker
        try:
            count = await count_at(self._http(backend.url), endpoint, request.text)
            answer = TokenCount(request_id=request.request_id, count=count)
        except NoTokenizer as exc:
            answer = RequestFailed(request_id=request.request_id, code=ErrorCode.REMOTE_ERROR, message=str(exc))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            answer = RequestFailed(request_id=request.request_id, code=ErrorCode.REMOTE_ERROR,
                                   message=f"{endpoint.describe(backend.url)} could not count: {reason(exc)}",
                                   retryable=True)  # fmt: skip
        self._out.put((emit, answer))
        self._wake()

    async def _watch_health(self) -> None:
        """Every HEALTH_INTERVAL_S, ask each server whether it answers: one that does not is taken
        out (its sessions move on their next request), one that does again is put back."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            for backend in list(self._backends):
                if backend.in_flight and backend.healthy:
                    continue  # streaming from it is proof enough
                try:
                    response = await self._http(backend.url).get(_HEALTH_PATHS[self._endpoint.engine],
                                                                 timeout=self._endpoint.connect_timeout_s)  # fmt: skip
                    alive = 200 <= response.status_code < 300
                    error = f"health check answered {response.status_code}"
                except httpx.HTTPError as exc:
                    alive, error = False, f"health check: {reason(exc)}"
                if alive and not backend.healthy:
                    log.info("%s answers again: back in", backend.url)
                    self._backends.answered(backend)
                elif not alive and backend.healthy:
                    log.warning("%s is down (%s): its sessions move", backend.url, error)
                    self._backends.failed(backend, error, time.monotonic())
            self._publish()

    def _send(self, generation: _Generation, message: FromWorker) -> None:
        self._out.put((generation.emit, message))
        self._wake()

    async def _serve(self, generation: _Generation) -> None:
        task = asyncio.current_task()
        assert task is not None
        generation.task = task
        watch = asyncio.ensure_future(self._watch_cancel(generation, task))
        reason = StopReason.ERROR
        try:
            reason = await self._attempts(generation)
        except asyncio.CancelledError:
            reason = StopReason.CANCELLED
        except ReplyFailure as failure:
            self._flush(generation, time.perf_counter())
            self._send(generation, RequestFailed(request_id=generation.request.request_id, code=failure.code,
                                                 message=self.redacted(failure.message), retryable=failure.retryable,
                                                 retry_after_ms=failure.retry_after_ms))  # fmt: skip
        except Exception as exc:  # a bug here must still end the request
            log.error("remote generation %s failed: %s", generation.request.request_id,
                      self.redacted(f"{type(exc).__name__}: {exc}"))  # fmt: skip
            self._flush(generation, time.perf_counter())
            self._send(generation, RequestFailed(request_id=generation.request.request_id, code=ErrorCode.INTERNAL,
                                                 message=self.redacted(f"{type(exc).__name__}: {exc}")))  # fmt: skip
        finally:
            watch.cancel()
        self._finish(generation, reason)

    def _finish(self, generation: _Generation, reason: StopReason) -> None:
        run = generation.run
        run.finished = time.perf_counter()
        if not run.prefill_done:
            run.prefill_done = run.finished
        self._flush(generation, run.finished)
        if not generation.counted and reason is not StopReason.CANCELLED:
            # Not every server sends usage in a stream (llama-cpp-python's does not): say so, not "0".
            run.cache_notes += ("the server reported no token counts: prompt_tokens is unknown",)
        self._send(generation, run_stats(run, 0))
        self._send(generation, run_finished(run, reason, 0))
        self._out.put(generation)
        self._wake()

    def _flush(self, generation: _Generation, now: float) -> None:
        """Send the text held back by DELTA_INTERVAL_S: all of it before a RequestFailed or the stats."""
        if generation.held:
            self._send(generation, token_delta(generation.run, generation.held, now))
            generation.held, generation.last_emit = "", now

    async def _watch_cancel(self, generation: _Generation, task: asyncio.Task[None]) -> None:
        """A cancel comes through step() at once (the shell wakes it); this also catches one nobody
        woke it for. And while the remote computes (a long prefill sends nothing), it shows the
        supervisor's hang check this worker is alive: idle_timeout_s bounds the remote's silence."""
        while not generation.cancelled():
            await asyncio.sleep(CANCEL_POLL_S)
            self.progress += 1
        while not task.done():  # a cancel can be swallowed by a wait it lands on as that wait ends
            task.cancel()
            await asyncio.sleep(CANCEL_POLL_S)

    async def _attempts(self, generation: _Generation) -> StopReason:
        """The request, tried again where the failure says it may help and nothing was generated yet:
        on another server at once when the one it went to could not be reached (failover), else once
        more on the same one after RETRY_DELAY_S (or the server's Retry-After)."""
        session = generation.request.session_id
        placement = self._backends.place(session)
        retried = False
        last: ReplyFailure | None = None
        for _ in range(len(self._endpoint.backends) + 1):
            backend = placement.backend
            if placement.moved_from:
                generation.run.cache_notes += (f"moved from {placement.moved_from} (down) to {backend.url}: "
                                               "its whole prompt evaluated there",)  # fmt: skip
            try:
                end = await self._on(backend, generation)
            except ReplyFailure as failure:
                last = failure
                if generation.events or not failure.retryable:
                    raise
                if failure.code is ErrorCode.REMOTE_UNREACHABLE:
                    self._backends.failed(backend, failure.message, time.monotonic())
                    self._publish()
                    other = self._backends.place(session, avoid=backend)
                    if other.backend is not backend and other.backend.healthy:
                        log.warning("%s; failing over to %s", failure.message, other.backend.url)
                        placement = other
                        continue
                wait = RETRY_DELAY_S if failure.retry_after_ms is None else failure.retry_after_ms / 1000.0
                if retried or wait > RETRY_AFTER_MAX_S:
                    raise
                retried = True
                log.warning("%s; trying again in %.1f s", failure.message, wait)
                await asyncio.sleep(wait)
                placement = self._backends.place(session)
            else:
                self._backends.answered(backend)
                run = generation.run
                if self._backends.served(session, backend, "".join(run.streamed),
                                         run.prompt_tokens if generation.counted else None, run.cached_tokens,
                                         generation.request.prompt):  # fmt: skip
                    run.cache_notes += (f"{backend.url} claimed {run.cached_tokens} cached tokens, more than this "
                                        "prompt shares with anything this model sent it: another client (or "
                                        "bastion model) shares the server, or it restored another "
                                        "conversation's state",)  # fmt: skip
                self._publish()
                return end
        # Servers came back and failed again while this request went round them: it has had its tries.
        assert last is not None
        raise last

    async def _on(self, backend: Backend, generation: _Generation) -> StopReason:
        backend.in_flight += 1
        self._publish()
        try:
            return await self._once(generation, backend.url)
        finally:
            backend.in_flight -= 1
            self._publish()

    async def _once(self, generation: _Generation, url: str) -> StopReason:
        endpoint, request = self._endpoint, generation.request
        # A retry starts afresh: nothing of an attempt that streamed no text is kept.
        generation.url, generation.calls, generation.end, generation.counted = url, {}, None, False
        sampling = request.sampling
        generation.guard = RepetitionGuard() if sampling.loop_guard and not sampling.ignore_eos else None
        pin = (url, request.session_id)
        slot = self._slots.get(pin) if endpoint.engine is RemoteEngine.LLAMA_SERVER else None
        if slot is not None and (url, slot) in self._slots_busy:
            # llama-server holds a request for a busy slot back, even with others free: let it choose.
            slot = None
        chat = endpoint.mode is RemoteMode.CHAT
        try:
            call = (chat_request(endpoint, request.prompt, request.sampling) if chat
                    else completion_request(endpoint, request.prompt, request.sampling, slot))  # fmt: skip
        except MalformedEvent as exc:
            raise ReplyFailure(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if endpoint.engine is RemoteEngine.OLLAMA:
            call.body["options"]["num_ctx"] = self._n_ctx
        if request.grammar is not None:
            generation.run.grammar = (
                GrammarOutcome(GrammarUse.UNAVAILABLE, "a chat-mode model's server is not sent grammars") if chat
                else constrain(endpoint.engine, request.grammar, call.body))  # fmt: skip
        where = endpoint.describe(url)
        if slot is not None:
            self._slots_busy.add((url, slot))
        try:
            return await self._exchange(generation, call, where)
        except ReplyFailure:
            if slot is not None:  # the slot may be gone (a restarted server with fewer): choose afresh next time
                self._slots.pop(pin, None)
            raise
        finally:
            if slot is not None:
                self._slots_busy.discard((url, slot))

    async def _exchange(self, generation: _Generation, call: CompletionRequest, where: str) -> StopReason:
        endpoint, url = self._endpoint, generation.url
        try:
            async with post_stream(url, call.path, msgspec.json.encode(call.body), self._headers,
                                   connect_timeout_s=endpoint.connect_timeout_s,
                                   idle_timeout_s=endpoint.idle_timeout_s) as response:  # fmt: skip
                if response.status_code >= 300:  # a redirect is not followed: the url is to fix
                    raise await status_failure(response, where, RETRY_DELAY_S)
                return await self._read(generation, response, call.framing)
        except Unreachable as exc:
            raise ReplyFailure(ErrorCode.REMOTE_UNREACHABLE, f"cannot reach {where}: {exc.reason}",
                           retryable=True) from None  # fmt: skip
        except Idle:
            raise ReplyFailure(ErrorCode.REMOTE_INTERRUPTED,
                           f"{where} sent nothing for {endpoint.idle_timeout_s:g} s (idle_timeout_s); "
                           "the reply so far is kept") from None  # fmt: skip
        except Cut as exc:
            if not generation.events:
                raise ReplyFailure(ErrorCode.REMOTE_UNREACHABLE, f"{where} closed the connection: {exc.reason}",
                               retryable=True) from None  # fmt: skip
            raise ReplyFailure(ErrorCode.REMOTE_INTERRUPTED,
                           f"{where} cut the reply off: {exc.reason}; the reply so far is kept") from None

    async def _read(self, generation: _Generation, response: StreamResponse, framing: Framing) -> StopReason:
        engine, where = self._endpoint.engine, self._endpoint.describe(generation.url)
        openai_style = engine is RemoteEngine.OPENAI or (
            self._endpoint.mode is RemoteMode.CHAT and engine is not RemoteEngine.OLLAMA)
        async for line in reply_lines(response):
            if line is None:  # what has arrived is used up
                self._flush(generation, time.perf_counter())
                if generation.last_emit:
                    # Once the first text is out, read at most every DELTA_INTERVAL_S: the server's
                    # tokens gather in the socket meanwhile and come in one read, instead of one
                    # wakeup of this process each, taken from the cores the server may decode on.
                    await response.rest(DELTA_INTERVAL_S)
                continue
            payload = line_payload(line, framing)
            if payload is None:
                continue
            if payload is END_OF_STREAM:  # OpenAI's end of stream, after the usage chunk
                return generation.end or StopReason.STOP
            try:
                event = (parse_chat_event(engine, payload) if self._endpoint.mode is RemoteMode.CHAT
                         else parse_event(engine, payload))  # fmt: skip
            except MalformedEvent as exc:
                raise ReplyFailure(ErrorCode.REMOTE_ERROR, f"{where} sent what its protocol does not: {exc}") from None
            if event.error:
                raise ReplyFailure(ErrorCode.REMOTE_ERROR, f"{where} failed: {event.error}")
            self.progress += 1
            end = self._take(generation, event)
            # An OpenAI-style stream (an OpenAI engine's, or any chat route but Ollama's) puts its
            # usage after the finish: read on to its [DONE]. A loop is cut at once (the connection
            # closes on the way out, which stops the server).
            if end is StopReason.REPETITION or (end is not None and not openai_style):
                return end
        if generation.end is not None:  # an OpenAI-compatible server that ends without [DONE]
            return generation.end
        raise ReplyFailure(ErrorCode.REMOTE_INTERRUPTED,
                       f"{where} ended the stream before the reply's end; the reply so far is kept")

    def _take(self, generation: _Generation, event: Event) -> StopReason | None:
        run, now = generation.run, time.perf_counter()
        if event.slot is not None:
            key = (generation.url, generation.request.session_id)
            self._slots[key] = event.slot
            self._slots.move_to_end(key)
            while len(self._slots) > REMEMBERED_SESSIONS:
                self._slots.popitem(last=False)
        for index, name, arguments in event.call_parts:
            call = generation.calls.setdefault(index, ["", ""])
            call[0] = call[0] or name
            call[1] += arguments
        if event.end is not None and generation.calls:
            # Calls the server parsed itself go on as text, for bastion's parser, as if the model wrote them.
            written = calls_as_text(generation.calls)
            generation.calls = {}
            before = event.text or "".join(generation.run.streamed)
            event = dataclasses.replace(event, text=event.text + ("\n" if before else "") + written)
        if event.text:
            generation.events += 1
            if not run.first_token:
                run.first_token = run.prefill_done = now
            run.completion_tokens += max(1, event.tokens)
            run.chars += len(event.text)
            run.streamed.append(event.text)
            generation.held += event.text
            if not generation.last_emit:  # the first text at once; the rest as each read is used up
                self._flush(generation, now)
            run.char_ends.append(run.chars)
            # Each event of these streams is a token; its text stands for its id in the guard.
            if generation.guard is not None and generation.guard.push(hash(event.text)):
                assert generation.guard.loop_start is not None
                start = generation.guard.loop_start
                run.keep_chars = keep_whole_words("".join(run.streamed), run.char_ends[start - 1] if start else 0)
                generation.end = StopReason.REPETITION
                return StopReason.REPETITION
        if event.prompt_tokens is not None:
            run.prompt_tokens = event.prompt_tokens
            generation.counted = True
        if event.cached_tokens is not None:
            run.cached_tokens = min(event.cached_tokens, run.prompt_tokens)
        if event.completion_tokens is not None:
            run.completion_tokens = event.completion_tokens
        if event.end is not None:
            generation.end = event.end
        return event.end

    async def _describe(self) -> ModelDescription:
        """The first server that describes itself gives the model's facts; the others that cannot be
        reached start out of rotation (health checks bring them back). None answering fails the load."""
        started = time.perf_counter()
        endpoint = self._endpoint
        failures: list[RemoteUnavailable] = []
        for backend in list(self._backends):
            try:
                facts = await server_facts(self._http(backend.url), self._endpoint, backend.url)
                break
            except RemoteUnavailable as exc:
                if exc.step != "reachable":
                    raise  # a server that answers wrongly is a configuration to fix, not a server to skip
                failures.append(exc)
                self._backends.failed(backend, str(exc), time.monotonic())
        else:
            if len(failures) == 1:
                raise failures[0]
            raise RemoteUnavailable("no server of the model answers: " + "; ".join(map(str, failures)),
                                    fix="start the servers, or correct `urls`")  # fmt: skip
        self._publish()  # servers after the one that answered are found out by health checks and requests
        description = model_description(facts, endpoint, name=self._name, n_ctx=self._n_ctx,
                                        load_ms=(time.perf_counter() - started) * 1000.0)  # fmt: skip
        self._n_ctx = description.n_ctx
        return description

# What a health check asks each engine for: cheap, and answered without a model at work.
_HEALTH_PATHS = {RemoteEngine.LLAMA_SERVER: "/health", RemoteEngine.OPENAI: "/v1/models",
                 RemoteEngine.OLLAMA: "/api/version"}

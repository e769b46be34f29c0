"""The LLM client behind `monoscope explain`: one OpenAI-compatible code path, local or remote, robust at scale.

    with open_llm("local:default", cache=features / "llm_cache.sqlite") as llm:      # GGUF run here
        answers = llm.chat_many([ChatRequest.user(p, max_tokens=64) for p in prompts], progress="explain")
    open_llm("openai:gpt-4o-mini")                                    # api.openai.com, OPENAI_API_KEY
    open_llm("openai:Qwen/Qwen2.5-7B-Instruct", endpoint="http://gpu:8000")         # vLLM, llama.cpp

`local:PATH` starts llama.cpp's HTTP server (PyPI `xllamacpp`, prebuilt) in this process on a free port
and talks to it exactly like to any other endpoint, so there is one code path to test.

Explaining thousands of features means thousands of requests, so a single failure must never stop a batch:
concurrency is bounded, transient failures (429, 5xx, timeouts, dropped connections) are retried with
exponential backoff and jitter, and a request that still fails becomes a `ChatResponse` with `error` set,
never an exception. Answers are cached in SQLite under the sha256 of the canonical request, committed one by
one, so a rerun costs nothing and a killed run resumes where it stopped. The parsing helpers at the end are
tolerant for the same reason: malformed model output is a None, not a crash.
"""

from __future__ import annotations

import ast
import contextlib
import email.utils
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from monoscope.errors import ModelError, MonoscopeError
from monoscope.progress import progress_bar

DEFAULT_TIMEOUT_S = 120.0
"""Seconds one attempt may take (`--timeout`); local models get this times the requests in flight."""
DEFAULT_RETRIES = 5
"""Retries of a request that failed transiently (`--retries`)."""
HEARTBEAT_S = 30.0
"""Seconds between "still waiting" lines while a remote endpoint has not answered an attempt."""
STALL_AFTER_TIMEOUTS = 3
"""Timed-out attempts in a row after which an endpoint counts as stalled and nothing more is sent."""
CACHE_FORMAT = 1  # part of every cache key: bump when the meaning of a cached answer changes
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit; llama.cpp accepts more but the portable bound is this


# --- requests and responses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion. Greedy (temperature 0) and seeded by default so cached answers are reproducible.

    `logprobs=k` asks for the k most likely tokens at each generated position (0..20), e.g. P("yes") for
    detection scoring; servers that cannot return them just answer without (`top_logprobs` is None).
    """

    messages: Sequence[Mapping[str, str]]
    max_tokens: int
    temperature: float = 0.0
    logprobs: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("a ChatRequest needs at least one message")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))

    @classmethod
    def user(cls, prompt: str, *, max_tokens: int, system: str | None = None, **kw: Any) -> ChatRequest:
        """The common case: one user message, optionally after a system message."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return cls(msgs, max_tokens=max_tokens, **kw)

    def canonical(self) -> dict[str, Any]:
        """Everything that determines the answer (with the model): what the cache key hashes."""
        return {"messages": [dict(m) for m in self.messages], "max_tokens": self.max_tokens,
                "temperature": float(self.temperature), "logprobs": self.logprobs, "seed": self.seed}


@dataclass(frozen=True)
class ChatResponse:
    """Either `text` (possibly empty) or `error` (one line: what failed, after how many attempts).

    `top_logprobs[i]` maps candidate token text -> log-probability at generated position i.
    """

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    top_logprobs: list[dict[str, float]] | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "top_logprobs": self.top_logprobs, "finish_reason": self.finish_reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, cached: bool) -> ChatResponse:
        return cls(text=d["text"], prompt_tokens=int(d.get("prompt_tokens") or 0),
                   completion_tokens=int(d.get("completion_tokens") or 0), cached=cached,
                   top_logprobs=d.get("top_logprobs"), finish_reason=d.get("finish_reason"))


def _failure(msg: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> ChatResponse:
    return ChatResponse(text=None, error=msg, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


@dataclass
class Usage:
    """What a session cost. Tokens and cost count only answers actually fetched, not cache hits."""

    requests: int = 0  # responses returned, cached and failed included
    cached: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time inside chat/chat_many
    price_per_mtok: tuple[float, float] = (0.0, 0.0)  # (prompt, completion) per million tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.price_per_mtok[0] + self.completion_tokens * self.price_per_mtok[1]) / 1e6

    def summary(self) -> str:
        cost = f", ${self.cost:,.4f}" if any(self.price_per_mtok) else ""
        return (f"{self.requests:,} requests ({self.cached:,} cached, {self.failures:,} failed, "
                f"{self.retries:,} retries), {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion "
                f"tokens{cost}, {self.seconds:,.1f} s")


# --- the response cache -----------------------------------------------------------------------------------


class ResponseCache:
    """Successful answers in SQLite (WAL), one commit per answer so a killed run loses at most the in-flight
    requests. Failures are not stored: a rerun retries them. Safe to delete at any time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                             "response TEXT NOT NULL, created REAL NOT NULL)")
        except sqlite3.DatabaseError as e:
            raise MonoscopeError(f"LLM cache {self.path} cannot be used ({e}): delete it (it only holds cached "
                                 "LLM answers) or pass another cache path") from e
        except OSError as e:
            raise MonoscopeError(f"cannot create the LLM cache {self.path}: {e.strerror or e}") from e

    def get(self, key: str) -> ChatResponse | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return ChatResponse.from_json(json.loads(row[0]), cached=True)
        except (ValueError, KeyError, TypeError):
            return None  # a damaged row is a miss; the fresh answer replaces it

    def put(self, key: str, model: str, response: ChatResponse) -> None:
        data = json.dumps(response.to_json(), ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (key, model, data, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def request_key(model_id: str, req: ChatRequest) -> str:
    """sha256 of the canonical request: the model's identity plus everything in `ChatRequest.canonical`."""
    canon = {"format": CACHE_FORMAT, "model": model_id, **req.canonical()}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode()).hexdigest()


# --- the local server -------------------------------------------------------------------------------------


class LocalServer:
    """llama.cpp's OpenAI-compatible server (xllamacpp) for one GGUF, in this process, on 127.0.0.1.

    `port=0` takes a free port; `n_threads=None` is `default_threads()`. `n_ctx` is per request: the KV
    cache holds `n_ctx * n_parallel` tokens, split evenly over `n_parallel` slots (decoded together, one
    batch per step). A prompt longer than `n_ctx` is an HTTP 400 (an error response, not retried).
    xllamacpp has no stop call: the server stops (loop terminated, HTTP threads joined, port freed) when
    its `Server` object is freed, which `close()` forces. Start-up takes ~0.5 s for SmolLM2 once the file
    is in the page cache.
    """

    def __init__(self, gguf: str | os.PathLike[str], *, n_ctx: int = 4096, n_parallel: int = 4,
                 n_threads: int | None = None, port: int = 0, verbose: bool = False) -> None:
        try:
            import xllamacpp
        except ImportError as e:
            raise MonoscopeError("--llm local:... needs the PyPI package xllamacpp (llama.cpp prebuilt): run "
                                 "`pip install xllamacpp`, or serve the model elsewhere and use openai:MODEL "
                                 "--endpoint URL") from e
        self.gguf = Path(gguf)
        p = xllamacpp.CommonParams()
        p.model.path = str(self.gguf)
        p.hostnames = ["127.0.0.1"]
        p.port = port
        p.n_parallel = n_parallel
        p.n_ctx = n_ctx * n_parallel
        p.kv_unified = False  # fixed per-slot share: every request gets exactly n_ctx
        p.warmup = False  # saves a second at start; the first request pays it instead
        p.verbosity = 3 if verbose else -1  # llama.cpp logs every request otherwise
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = n_threads or default_threads()
        t0 = time.monotonic()
        try:
            self._srv: Any = xllamacpp.Server(p)
        except Exception as e:  # xllamacpp raises a bare RuntimeError and logs the cause
            raise ModelError(f"llama.cpp could not load {self.gguf} ({e}): check that it is a GGUF chat model "
                             "llama.cpp supports and that n_ctx fits in memory") from e
        self.startup_s = time.monotonic() - t0
        self.n_threads = int(p.cpuparams.n_threads)
        self.url = f"{self._srv.listening_address}/v1"

    def close(self) -> None:
        """Stop the server: the C++ destructor terminates the loop and joins its threads."""
        self._srv = None

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_threads() -> int:
    """The usable cores less those other work keeps busy now (`busy_cores`), and at least half of them.

    llama.cpp's threads wait on each other at every step, so one that the OS deschedules stalls them all: with
    both cores of a shared 2-core machine SmolLM2 fell from 36 to 2 tokens/s while another job ran, hence half
    the cores on a busy machine. On a quiet one every core pays: on a quiet 2-core Zen 4, 14 requests to
    Qwen2.5-Coder-1.5B (12 one-excerpt detection prompts and 2 short completions, 2 in flight) took 57-60 s on
    1 thread and 30-33 s on 2. `--threads` overrides this."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    busy = busy_cores()
    idle = 0 if math.isinf(busy) else cores - round(busy)
    return max(1, cores // 2, idle)


def busy_cores(reads: int = 5, gap_s: float = 0.02) -> float:
    """Tasks running or runnable now other than this reader: /proc/loadavg's fourth field less one, the median of
    `reads` reads `gap_s` apart (instantaneous, unlike the load averages, which still count a job that ended a
    minute ago); else the 1-minute load average; inf where neither exists (then the machine counts as shared)."""
    counts = []
    try:
        for i in range(reads):
            if i:
                time.sleep(gap_s)
            with open("/proc/loadavg", encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        return float(statistics.median(counts))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return math.inf


# --- the client -------------------------------------------------------------------------------------------


class LLM:
    """Chat completions against one OpenAI-compatible endpoint. Thread-safe; use `open_llm` to make one.

    At most `max_concurrency` requests are in flight per LLM, whether they come from `chat_many` or from
    callers' own threads. After `max_consecutive_failures` failed requests in a row (a dead endpoint, a
    wrong key) the rest of the batch fails at once instead of retrying for hours. An endpoint that accepts
    connections and never answers costs `timeout_s` per attempt: every failed attempt is reported through
    `notify` (one line: which endpoint, attempt i/n, what failed, the wait before the next), and after
    `max_consecutive_timeouts` attempts in a row timed out the LLM is `stalled`: nothing more is sent and the
    caller stops with `stalled` as its message.
    """

    def __init__(self, *, model: str, base_url: str | None, api_key: str, model_id: str | None = None,
                 cache: str | os.PathLike[str] | None = None, max_concurrency: int = 4, timeout_s: float = 120,
                 retries: int = 5, price_per_mtok: tuple[float, float] = (0.0, 0.0), backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, max_consecutive_failures: int = 16,
                 max_consecutive_timeouts: int = STALL_AFTER_TIMEOUTS, server: LocalServer | None = None,
                 notify: Callable[[str], None] | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        import openai

        if max_concurrency < 1:
            raise MonoscopeError(f"--concurrency {max_concurrency}: use 1 or more requests in flight")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise MonoscopeError(f"--retries {retries}: use 0 or more retries of a failed request (e.g. 2)")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise MonoscopeError(f"--timeout {timeout_s}: use a positive number of seconds per attempt (e.g. 60)")
        if max_consecutive_timeouts < 1:
            raise MonoscopeError(f"max_consecutive_timeouts={max_consecutive_timeouts}: use 1 or more")
        self.model_name = model
        self.model_id = model_id or model  # the cache's notion of "same model"
        self.base_url = base_url
        self.max_concurrency, self.timeout_s, self.retries = max_concurrency, float(timeout_s), retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_consecutive_failures = max_consecutive_failures
        self.max_consecutive_timeouts = max_consecutive_timeouts
        self.notify: Callable[[str], None] = notify if notify is not None else _stderr_line
        self.heartbeat_s = heartbeat_s if server is None else 0.0  # a local model is slow, not silent
        self.stalled: str | None = None
        """Set after `max_consecutive_timeouts` timed-out attempts in a row: why nothing more is sent."""
        self._consecutive_timeouts = 0
        self._stop = threading.Event()  # set when stalled: waiting requests give up at once
        self.server = server
        self._openai: Any = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=self.timeout_s)
        self._cache = ResponseCache(cache) if cache is not None else None
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._usage = Usage(price_per_mtok=(float(price_per_mtok[0]), float(price_per_mtok[1])))
        self._consecutive_failures = 0
        self._last_error = ""
        self._rng = random.Random()

    @property
    def usage(self) -> Usage:
        """A snapshot of the counters so far."""
        with self._lock:
            return replace(self._usage)

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    def chat(self, req: ChatRequest) -> ChatResponse:
        return self.chat_many([req])[0]

    def chat_many(self, reqs: Sequence[ChatRequest], *, progress: str | None = None) -> list[ChatResponse]:
        """Answers in the order of `reqs`; cache hits first, then the rest on a pool of `max_concurrency`.

        Identical requests in one batch are sent once. `progress` labels a progress bar (None: no bar).
        """
        t0 = time.monotonic()
        out: list[ChatResponse | None] = [None] * len(reqs)
        pending: dict[str, list[int]] = {}
        for i, req in enumerate(reqs):
            key = request_key(self.model_id, req)
            hit = self._cache.get(key) if self._cache is not None else None
            if hit is not None:
                out[i] = hit
            else:
                pending.setdefault(key, []).append(i)
        n_hits = len(reqs) - sum(len(v) for v in pending.values())
        dup_hits = 0
        try:
            with progress_bar(progress or "llm", total=len(reqs), unit="req", enabled=progress is not None) as bar:
                bar.update(n_hits)
                for key, resp in self._run(pending, reqs):
                    for j, i in enumerate(pending[key]):
                        out[i] = resp if j == 0 or not resp.ok else replace(resp, cached=True)
                        dup_hits += int(j > 0 and resp.ok)
                    bar.update(len(pending[key]), **self._status())
        finally:
            with self._lock:
                self._usage.seconds += time.monotonic() - t0
        with self._lock:
            self._usage.requests += len(out)
            self._usage.cached += n_hits + dup_hits
        return cast(list[ChatResponse], out)

    def _run(self, pending: dict[str, list[int]], reqs: Sequence[ChatRequest]) -> Iterator[tuple[str, ChatResponse]]:
        """Yield (key, response) as requests finish; a single request runs inline, no pool."""
        abort = threading.Event()  # set on Ctrl-C: running requests stop before their next try
        if len(pending) == 1:
            key, idx = next(iter(pending.items()))
            yield key, self._fetch(reqs[idx[0]], key, abort)
        if len(pending) <= 1:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(pending)), thread_name_prefix="llm")
        futures: dict[Future[ChatResponse], str] = {pool.submit(self._fetch, reqs[idx[0]], key, abort): key
                                                    for key, idx in pending.items()}
        try:
            for f in as_completed(futures):
                yield futures[f], f.result()
        except BaseException:
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _status(self) -> dict[str, str]:
        u = self.usage
        s = {"tok": f"{u.tokens:,}", "failed": str(u.failures)}
        if any(u.price_per_mtok):
            s["cost"] = f"${u.cost:.3f}"
        return s

    def _fetch(self, req: ChatRequest, key: str, abort: threading.Event) -> ChatResponse:
        """One request, retried; counted in usage, stored in the cache when it succeeded. Never raises."""
        with self._lock:
            broken = self._consecutive_failures >= self.max_consecutive_failures
            last = self._last_error
        if self.stalled is not None:
            resp = _failure(f"not sent: {self.stalled}")
        elif broken:
            resp = _failure(f"not sent: the {self.max_consecutive_failures} requests before it failed "
                            f"(last: {last})")
        else:
            try:
                resp = self._call(req, abort)
            except Exception as e:  # a bug or an unforeseen client error must not sink the batch
                resp = _failure(f"{type(e).__name__}: {e}")
        with self._lock:
            self._usage.prompt_tokens += resp.prompt_tokens
            self._usage.completion_tokens += resp.completion_tokens
            if resp.ok:
                self._consecutive_failures = 0
            else:
                self._usage.failures += 1
                if not broken and self.stalled is None:
                    self._consecutive_failures += 1
                    self._last_error = resp.error or ""
        if resp.ok and self._cache is not None:
            try:
                self._cache.put(key, self.model_id, resp)
            except sqlite3.Error:
                pass  # a full disk or a locked file only costs the same request next time
        return resp

    def _call(self, req: ChatRequest, abort: threading.Event) -> ChatResponse:
        oa = self._openai
        body: dict[str, Any] = {"model": self.model_name, "messages": list(req.messages),
                                "max_tokens": req.max_tokens, "temperature": req.temperature, "seed": req.seed}
        if req.logprobs is not None:
            body |= {"logprobs": True, "top_logprobs": req.logprobs}
        error = ""
        tries = self.retries + 1
        for attempt in range(tries):
            if abort.is_set():
                return _failure(f"not sent: interrupted ({error or 'before the first try'})")
            if self.stalled is not None:
                return _failure(f"not sent: {self.stalled}")
            retry_after: float | None = None
            timed_out = False
            try:
                with self._slots, self._heartbeat(attempt + 1, tries):
                    raw = self._client.chat.completions.with_raw_response.create(**body, timeout=self.timeout_s)
                with self._lock:
                    self._consecutive_timeouts = 0
                return parse_completion(raw.text)
            except oa.APIStatusError as e:
                error = f"HTTP {e.status_code}: {_one_line(_error_message(e))}"
                if not (e.status_code in (408, 429) or e.status_code >= 500):
                    return _failure(error)  # the request itself is wrong: retrying cannot help
                retry_after = _retry_after(e.response.headers)
            except oa.APITimeoutError:
                error = f"timed out after {self.timeout_s:g} s"
                timed_out = True
            except oa.APIConnectionError as e:
                error = f"connection failed ({_one_line(str(e.__cause__ or e))})"
            if self._count_timeout(timed_out):
                self.notify(f"{self.where}: attempt {attempt + 1}/{tries} {error}; stopping: {self.stalled}")
                return _failure(f"{error} (stopped: {self.stalled})")
            if self.stalled is not None:  # another request stalled the endpoint meanwhile: no retry
                return _failure(f"{error} (stopped: {self.stalled})")
            if attempt < self.retries:
                with self._lock:
                    self._usage.retries += 1
                delay = self._delay(attempt, retry_after)
                self.notify(f"waiting for {self.where}: attempt {attempt + 1}/{tries} {error}; "
                            f"retrying in {delay:.1f} s")
                self._wait(abort, delay)
            else:
                self.notify(f"{self.where}: attempt {attempt + 1}/{tries} {error}; giving up on this request")
        return _failure(f"{error} (after {tries} attempt{'s' if tries > 1 else ''})")

    @contextlib.contextmanager
    def _heartbeat(self, attempt: int, tries: int) -> Iterator[None]:
        """While one attempt waits for its answer, a line every `heartbeat_s` seconds (0: none), so a silent
        endpoint is visible long before the timeout."""
        if not 0 < self.heartbeat_s < self.timeout_s:
            yield
            return
        done = threading.Event()
        t0 = time.monotonic()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                self.notify(f"still waiting for {self.where}: attempt {attempt}/{tries}, "
                            f"{time.monotonic() - t0:.0f} s of {self.timeout_s:g} s")

        thread = threading.Thread(target=beat, name="llm-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()

    @property
    def where(self) -> str:
        """The endpoint, for messages."""
        if self.server is not None:
            return f"local llama.cpp server {self.base_url}"
        return self.base_url or "api.openai.com"

    def _count_timeout(self, timed_out: bool) -> bool:
        """Count consecutive timed-out attempts (any answer resets the count); True when this one stalls the LLM."""
        with self._lock:
            self._consecutive_timeouts = self._consecutive_timeouts + 1 if timed_out else 0
            if self.stalled is None and self._consecutive_timeouts >= self.max_consecutive_timeouts:
                self.stalled = (f"{self.where} did not answer {self._consecutive_timeouts} attempts in a row "
                                f"within {self.timeout_s:g} s each")
                self._stop.set()
                return True
        return False

    def _wait(self, abort: threading.Event, seconds: float) -> None:
        """Sleep before a retry; returns early on Ctrl-C (`abort`) or once the LLM is stalled."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not abort.is_set() and not self._stop.is_set():
            abort.wait(min(left, 0.1))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (so parallel workers do not retry in lockstep); Retry-After is a floor."""
        d = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_backoff_s))
        return d

    def close(self) -> None:
        """Close the HTTP client and the cache; stop the local server if this LLM started one."""
        with contextlib.suppress(Exception):
            self._client.close()
        if self._cache is not None:
            self._cache.close()
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.model_name!r}, base_url={self.base_url!r})"


def open_llm(spec: str, *, endpoint: str | None = None, cache: str | os.PathLike[str] | None = None,
             max_concurrency: int = 4, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
             price_per_mtok: tuple[float, float] = (0.0, 0.0), n_ctx: int = 4096, n_threads: int | None = None,
             backoff_s: float = 1.0, max_consecutive_timeouts: int = STALL_AFTER_TIMEOUTS,
             notify: Callable[[str], None] | None = None) -> LLM:
    """An LLM from a `--llm` spec: `openai:MODEL` (with `endpoint` for vLLM / llama.cpp / any compatible
    server, else api.openai.com) or `local:PATH.gguf` / `local:NAME` (llama.cpp in this process; NAME from
    `monoscope.interp.models`, `default` = the strongest installed, announced through `notify`).

    The API key is OPENAI_API_KEY, or "none" (local servers ignore it). `n_ctx` (tokens per request) and
    `n_threads` (default: `default_threads()`) only apply to local models, whose timeout is `timeout_s` times
    `max_concurrency`. `price_per_mtok` is (prompt, completion) per million tokens.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("openai", "local"):
        raise MonoscopeError(f"--llm {spec!r} is not an LLM spec: use openai:MODEL (add --endpoint URL for a vLLM "
                             "or llama.cpp server) or local:PATH.gguf (local:default = the strongest installed local "
                             "model)")
    opts: dict[str, Any] = {"cache": cache, "max_concurrency": max_concurrency, "timeout_s": timeout_s,
                            "retries": retries, "price_per_mtok": price_per_mtok, "backoff_s": backoff_s,
                            "max_consecutive_timeouts": max_consecutive_timeouts, "notify": notify}
    if kind == "openai":
        if not rest:
            raise MonoscopeError(f"--llm {spec!r} names no model: use openai:MODEL, e.g. openai:gpt-4o-mini")
        key = os.environ.get("OPENAI_API_KEY")
        if endpoint is None and not key:
            raise MonoscopeError(f"--llm {spec!r} needs --endpoint URL (a vLLM or llama.cpp server) or "
                                 "OPENAI_API_KEY set for api.openai.com")
        return LLM(model=rest, base_url=_endpoint_url(endpoint) if endpoint else None, api_key=key or "none", **opts)
    if endpoint is not None:
        raise MonoscopeError(f"--endpoint {endpoint!r} is for openai:MODEL; --llm {spec!r} runs the GGUF here: "
                             "drop one of them")
    if not rest:
        raise MonoscopeError(f"--llm {spec!r} names no GGUF file: use local:PATH.gguf or local:default")
    from monoscope.interp.models import resolve_local, spec_is_known, stronger_hint

    if spec_is_known(rest):
        known, path = resolve_local(rest)
        say = notify or _stderr_line
        say(f"explainer: {known.title} ({spec}, {path})")
        if rest in ("default", "small") and (hint := stronger_hint(known)):
            say(hint)
    else:
        path = Path(rest).expanduser()
        if not path.is_file():
            raise MonoscopeError(f"--llm {spec!r}: GGUF file {str(path)!r} not found: check the path, or use "
                                 "local:default (the strongest installed local model: see `monoscope models list`)")
    if n_ctx < 256:
        raise MonoscopeError(f"n_ctx={n_ctx} is too small for explanation prompts: use 4096 or more")
    server = LocalServer(path, n_ctx=n_ctx, n_parallel=max_concurrency, n_threads=n_threads)
    # the slots share the CPU, so each of n requests in flight runs at ~1/n speed; a timeout there is never a
    # network hang, and a retry would only redo the same prompt (SmolLM2 reads ~70 prompt tokens/s per thread)
    opts["timeout_s"] = timeout_s * max_concurrency
    try:
        # the file's name and size identify the model for the cache; hashing GBs on every start would not pay
        return LLM(model=path.name, base_url=server.url, api_key="none", server=server,
                   model_id=f"gguf:{path.name}:{path.stat().st_size}", **opts)
    except BaseException:
        server.close()
        raise


def _stderr_line(msg: str) -> None:
    """The default `notify`: one line on stderr, above a progress bar when one is shown."""
    from monoscope.progress import console

    console.print(msg, markup=False, highlight=False, soft_wrap=True)


def _endpoint_url(endpoint: str) -> str:
    """`http://host:8000` and `http://host:8000/v1` both mean the OpenAI API root `.../v1`."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MonoscopeError(f"--endpoint {endpoint!r} is not an http(s) URL: use e.g. http://localhost:8000/v1")
    return endpoint.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")


def _one_line(s: str, limit: int = 200) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        if msg:
            return str(msg)
    return str(getattr(e, "message", e))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` / `Retry-After` (seconds or an HTTP date), None when absent or unreadable."""
    with contextlib.suppress(ValueError, TypeError):
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def parse_completion(body: str) -> ChatResponse:
    """A chat-completion body -> response; anything malformed is an error response (not retried)."""
    try:
        data = json.loads(body)
    except ValueError:
        return _failure(f"response is not JSON: {_one_line(body, 80)!r}")
    if not isinstance(data, dict):
        return _failure(f"response is not a JSON object: {_one_line(body, 80)!r}")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    pt, ct = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        err = data.get("error")
        why = f"server error: {_one_line(str(err.get('message', err) if isinstance(err, dict) else err))}" if err \
            else f"response has no choices: {_one_line(body, 80)!r}"
        return _failure(why, pt, ct)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    finish = choice.get("finish_reason")
    if not isinstance(content, str):
        return _failure(f"response has no message content (finish_reason={finish})", pt, ct)
    return ChatResponse(text=content, prompt_tokens=pt, completion_tokens=ct,
                        top_logprobs=_top_logprobs(choice.get("logprobs")), finish_reason=finish)


def _int(x: Any) -> int:
    try:
        return max(0, int(x))
    except (TypeError, ValueError):
        return 0


def _top_logprobs(lp: Any) -> list[dict[str, float]] | None:
    """OpenAI's `logprobs.content[i].top_logprobs` -> [{token: logprob}] per position (same-text tokens merged)."""
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out: list[dict[str, float]] = []
    for pos in content:
        if not isinstance(pos, dict):
            return None
        cands = pos.get("top_logprobs") or [pos]
        d: dict[str, float] = {}
        for c in cands:
            if isinstance(c, dict) and isinstance(c.get("token"), str) and isinstance(c.get("logprob"), int | float):
                t, v = c["token"], float(c["logprob"])
                d[t] = float(math.log(math.exp(d[t]) + math.exp(v))) if t in d else v
        out.append(d)
    return out


# --- tolerant parsing of model output ---------------------------------------------------------------------


def parse_json_object(text: str | None) -> dict[str, Any] | None:
    """The first JSON object in `text`: inside ``` fences, after or before prose, with trailing commas or
    Python-style quotes (what small models write). None when there is none."""
    if not text:
        return None
    dec = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"\{", text)]
    for s in starts:
        try:
            obj, _ = dec.raw_decode(text, s)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    for s in starts:  # second chance: repair the balanced {...} that starts here
        chunk = _balanced(text, s)
        if chunk is None:
            continue
        for attempt in (re.sub(r",\s*([}\]])", r"\1", chunk),):
            with contextlib.suppress(ValueError):
                obj = json.loads(attempt)
                if isinstance(obj, dict):
                    return obj
            with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
                py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", attempt)))
                obj = ast.literal_eval(py)
                if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
                    return obj
    return None


def _balanced(text: str, start: int) -> str | None:
    """`text[start:]` up to the brace that closes the one at `start`, skipping quoted strings."""
    depth, quote, esc = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start: i + 1]
    return None


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_KEYED = re.compile(r"(?:score|rating|answer|activation|prediction|value|probability)\W{0,3}(?:is|=|:)?\s*(" +
                    _NUMBER + ")", re.IGNORECASE)


def parse_number(text: str | None, lo: float, hi: float) -> float | None:
    """The number the model answered, if it lies in [lo, hi]; None otherwise (out of range = misunderstood).

    Prefers a bare number, then one after "score:" / "answer is" and the like, then the first number in
    range, so "On a scale of 0 to 10 I'd say 7" reads 7 only when keyed; ask for the number first.
    """
    if not text:
        return None
    t = text.strip().strip("`*_ \n\t").rstrip(".").strip()

    def ok(s: str) -> float | None:
        try:
            v = float(s)
        except ValueError:
            return None
        return v if math.isfinite(v) and lo <= v <= hi else None

    if re.fullmatch(_NUMBER, t):
        return ok(t)
    for m in _KEYED.finditer(t):
        if (v := ok(m.group(1))) is not None:
            return v
    for m in re.finditer(r"(?<![\w.])" + _NUMBER, t):
        if (v := ok(m.group(0))) is not None:
            return v
    return None


_YES = {"yes", "true", "correct", "affirmative"}
_NO = {"no", "false", "incorrect", "negative"}


def parse_yes_no(text: str | None) -> bool | None:
    """Yes/no from a model answer: its first word if that decides, else the only one of yes/no it contains."""
    if not text:
        return None
    words = re.findall(r"[a-z]+", text.lower())
    if words in (["y"], ["n"]):
        return words == ["y"]
    skip = {"answer", "final", "the", "is", "my", "a"}
    first = next((w for w in words if w not in skip), "")
    if first in _YES:
        return True
    if first in _NO:
        return False
    has_yes, has_no = "yes" in words, "no" in words
    return has_yes if has_yes != has_no else None


def yes_probability(top_logprobs: list[dict[str, float]] | None, position: int = 0) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the candidates at one generated position ("Yes", " yes", "YES"... all count).

    None when neither appears among the candidates (ask for more `logprobs`, or fall back to the text).
    """
    if not top_logprobs or position >= len(top_logprobs):
        return None
    p_yes = p_no = 0.0
    for tok, lp in top_logprobs[position].items():
        w = tok.strip().lower()
        if w == "yes":
            p_yes += math.exp(lp)
        elif w == "no":
            p_no += math.exp(lp)
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None


__all__ = [
    "LLM",
    "ChatRequest",
    "ChatResponse",
    "LocalServer",
    "ResponseCache",
    "Usage",
    "open_llm",
    "parse_completion",
    "parse_json_object",
    "parse_number",
    "parse_yes_no",
    "request_key",
    "yes_probability",
]

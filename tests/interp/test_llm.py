"""The LLM client: real llama.cpp server, retries and timeouts against a fault server, cache, concurrency, parsing."""

from __future__ import annotations

import email.utils
import math
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from monoscope.errors import MonoscopeError
from monoscope.interp import (
    ChatRequest,
    open_llm,
    parse_json_object,
    parse_number,
    parse_yes_no,
    yes_probability,
)
from monoscope.interp.llm import LLM, LocalServer, _endpoint_url, _retry_after, parse_completion, request_key
from tests.interp.conftest import FaultServer


def fast_llm(fs: FaultServer, **kw: object) -> LLM:
    opts: dict[str, object] = {"retries": 3, "timeout_s": 5.0, "backoff_s": 0.01} | kw
    return open_llm("openai:fake-model", endpoint=fs.url, **opts)  # type: ignore[arg-type]


def ask(text: str, **kw: object) -> ChatRequest:
    return ChatRequest.user(text, max_tokens=8, **kw)  # type: ignore[arg-type]


# --- the real server --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_server_through_openai_path(llm_server: LocalServer) -> None:
    with open_llm("openai:smollm2", endpoint=llm_server.url, timeout_s=60) as llm:
        r = llm.chat(ChatRequest.user("Say hello.", max_tokens=8))
        assert r.ok and r.text and r.prompt_tokens > 5 and 0 < r.completion_tokens <= 8, r
        q = llm.chat(ChatRequest.user("Is Paris in France? Answer yes or no.", max_tokens=1, logprobs=5))
        assert q.ok and q.top_logprobs and len(q.top_logprobs) == 1 and len(q.top_logprobs[0]) >= 2, q
        assert all(v <= 0 for v in q.top_logprobs[0].values())
        u = llm.usage
        assert u.requests == 2 and u.failures == 0 and u.completion_tokens == r.completion_tokens + 1
        assert u.cost == 0


@pytest.mark.integration
def test_local_smollm2_starts_and_stops_its_server(tmp_path: Path) -> None:
    with open_llm("local:smollm2", max_concurrency=2, n_threads=1, cache=tmp_path / "c.sqlite") as llm:
        assert llm.model_name == "SmolLM2-135M-Instruct.Q4_1.gguf" and llm.server is not None
        url = llm.server.url
        rs = llm.chat_many([ask("Name a colour."), ask("Name a fruit.")], progress="test")
        assert all(r.ok and r.text for r in rs), rs
        assert llm.usage.completion_tokens > 0
    host = urlsplit(url)
    with pytest.raises(OSError), socket.create_connection((host.hostname, host.port), timeout=2):
        pass  # the server is gone once the LLM is closed


# --- retries, timeouts, malformed answers ------------------------------------------------------------------


def test_5xx_retried_then_success(fault_server: FaultServer) -> None:
    fault_server.script("500", "503", "ok")
    with fast_llm(fault_server) as llm:
        r = llm.chat(ask("hi"))
        assert r.ok and r.text == "echo: hi" and not r.cached
        assert fault_server.requests == 3 and llm.usage.retries == 2 and llm.usage.failures == 0


def test_429_honours_retry_after(fault_server: FaultServer) -> None:
    fault_server.retry_after = 0.4
    fault_server.script("429", "ok")
    with fast_llm(fault_server) as llm:
        t0 = time.monotonic()
        r = llm.chat(ask("hi"))
        assert r.ok and time.monotonic() - t0 >= 0.4 and fault_server.requests == 2


def test_retry_after_forms() -> None:
    assert _retry_after({"retry-after": "2"}) == 2.0 and _retry_after({"retry-after-ms": "250"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (_retry_after({"retry-after": date}) or 0) <= 30
    assert _retry_after({}) is None and _retry_after({"retry-after": "soon"}) is None


def test_request_validation() -> None:
    for bad in ({"max_tokens": 0}, {"logprobs": 21}):
        with pytest.raises(ValueError):
            ChatRequest([{"role": "user", "content": "x"}], **{"max_tokens": 4, **bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChatRequest([], max_tokens=4)


def test_exhausted_retries_give_an_error_response(fault_server: FaultServer) -> None:
    fault_server.script("500", "500", "500", "ok")
    with fast_llm(fault_server, retries=2) as llm:
        r = llm.chat(ask("hi"))
    assert not r.ok and r.text is None and "HTTP 500" in (r.error or "") and "3 attempts" in (r.error or "")
    assert "scripted 500" in (r.error or "") and fault_server.requests == 3 and llm.usage.failures == 1


@pytest.mark.parametrize("code", ["400", "401"])
def test_client_errors_not_retried(fault_server: FaultServer, code: str) -> None:
    fault_server.script(code)
    with fast_llm(fault_server) as llm:
        r = llm.chat(ask("hi"))
    assert r.error and r.error.startswith(f"HTTP {code}") and fault_server.requests == 1


def test_hang_times_out_then_retry_succeeds(fault_server: FaultServer) -> None:
    fault_server.hang_s = 3.0
    fault_server.script("hang", "hang")
    with fast_llm(fault_server, timeout_s=0.3, retries=1) as llm:
        t0 = time.monotonic()
        r = llm.chat(ask("hi"))
        assert r.error and "timed out after 0.3 s" in r.error and time.monotonic() - t0 < 2.0
        assert llm.chat(ask("again")).ok  # the script is used up: the next one answers


@pytest.mark.parametrize(("action", "why"), [("garbage", "not JSON"), ("nochoices", "no choices"),
                                              ("error", "model overloaded")])
def test_malformed_answers_are_error_records(fault_server: FaultServer, tmp_path: Path, action: str,
                                             why: str) -> None:
    fault_server.script(action)
    with fast_llm(fault_server, cache=tmp_path / "c.sqlite") as llm:
        r = llm.chat(ask("hi"))
        assert r.error and why in r.error and fault_server.requests == 1
        assert llm.chat(ask("hi")).ok and fault_server.requests == 2  # failures are not cached


def test_dead_endpoint_is_an_error_and_the_batch_stops_early() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with open_llm("openai:m", endpoint=f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01,
                  max_concurrency=1) as llm:
        llm.max_consecutive_failures = 2
        rs = llm.chat_many([ask(str(i)) for i in range(5)])
    assert all(r.error for r in rs) and "connection failed" in (rs[0].error or "")
    assert sum("not sent" in (r.error or "") for r in rs) == 3 and llm.usage.failures == 5


# --- cache ------------------------------------------------------------------------------------------------


def test_cache_hit_makes_no_request_and_survives_reopening(fault_server: FaultServer, tmp_path: Path) -> None:
    cache = tmp_path / "feats" / "llm_cache.sqlite"
    with fast_llm(fault_server, cache=cache, price_per_mtok=(1.0, 2.0)) as llm:
        a = llm.chat(ask("hi"))
        b = llm.chat(ask("hi"))
        assert a.ok and not a.cached and b.cached and b.text == a.text and fault_server.requests == 1
        u = llm.usage
        assert (u.requests, u.cached, u.prompt_tokens, u.completion_tokens) == (2, 1, 10, 3)
        assert math.isclose(u.cost, (10 * 1.0 + 3 * 2.0) / 1e6) and "cached" in u.summary()
    with fast_llm(fault_server, cache=cache) as llm:
        c = llm.chat(ask("hi"))
        assert c.cached and c.text == a.text and c.prompt_tokens == 10 and fault_server.requests == 1
        assert llm.usage.tokens == 0


def test_different_params_are_different_keys(fault_server: FaultServer, tmp_path: Path) -> None:
    base = ask("hi")
    variants = [ask("hi", temperature=0.5), ask("hi", seed=1), ask("hi", logprobs=5),
                ChatRequest.user("hi", max_tokens=9), ChatRequest.user("hi", max_tokens=8, system="be brief")]
    keys = {request_key("m", r) for r in [base, *variants]} | {request_key("other-model", base)}
    assert len(keys) == len(variants) + 2
    assert request_key("m", base) == request_key("m", ask("hi"))  # deterministic
    with fast_llm(fault_server, cache=tmp_path / "c.sqlite") as llm:
        rs = llm.chat_many([base, *variants, base])  # the duplicate is sent once
        assert fault_server.requests == len(variants) + 1 and rs[-1].cached and llm.cache is not None
        assert len(llm.cache) == len(variants) + 1


def test_corrupt_cache_file_is_a_one_line_error(tmp_path: Path, fault_server: FaultServer) -> None:
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(MonoscopeError, match="delete it"):
        fast_llm(fault_server, cache=bad)


# --- concurrency and order --------------------------------------------------------------------------------


def test_concurrency_bound_and_order(fault_server: FaultServer) -> None:
    fault_server.delay_s = 0.15
    with fast_llm(fault_server, max_concurrency=3) as llm:
        rs = llm.chat_many([ask(f"q{i}") for i in range(9)], progress="test")
    assert [r.text for r in rs] == [f"echo: q{i}" for i in range(9)]
    assert fault_server.max_active == 3 and fault_server.requests == 9


def test_logprobs_are_requested_and_returned(fault_server: FaultServer) -> None:
    fault_server.logprobs = [{"Yes": math.log(0.6), " yes": math.log(0.2), "No": math.log(0.2)}]
    with fast_llm(fault_server) as llm:
        r = llm.chat(ask("is it?", logprobs=3))
        plain = llm.chat(ask("is it?"))
    assert fault_server.bodies[0]["logprobs"] is True and fault_server.bodies[0]["top_logprobs"] == 3
    assert "logprobs" not in fault_server.bodies[1] and plain.top_logprobs is None
    assert r.top_logprobs is not None and yes_probability(r.top_logprobs) == pytest.approx(0.8)


# --- specs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "endpoint", "match"), [
    ("gpt-4o", None, "openai:MODEL"),
    ("anthropic:claude", None, "openai:MODEL"),
    ("openai:", None, "names no model"),
    ("openai:gpt-4o-mini", None, "OPENAI_API_KEY"),
    ("openai:m", "localhost:8000", "not an http"),
    ("local:/nowhere/model.gguf", None, "not found"),
    ("local:", None, "names no GGUF"),
    ("local:default", "http://x:1", "--endpoint"),
])
def test_bad_specs_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, spec: str, endpoint: str | None,
                                       match: str) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MonoscopeError, match=match) as e:
        open_llm(spec, endpoint=endpoint)
    assert "\n" not in str(e.value) and (spec in str(e.value) or str(endpoint) in str(e.value))


def test_endpoint_forms_and_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _endpoint_url("http://h:8000") == _endpoint_url("http://h:8000/") == "http://h:8000/v1"
    assert _endpoint_url("http://h:8000/v1/") == "http://h:8000/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with open_llm("openai:gpt-4o-mini") as llm:  # no endpoint: api.openai.com with the key
        assert llm.model_name == "gpt-4o-mini" and llm.base_url is None


# --- parsing ------------------------------------------------------------------------------------------------


def test_parse_json_object_messy() -> None:
    assert parse_json_object('```json\n{"explanation": "dates", "score": 3}\n```') == {"explanation": "dates",
                                                                                        "score": 3}
    assert parse_json_object('Sure! Here it is: {"a": {"b": [1, 2]}} Hope that helps {"c": 1}') == {"a": {"b": [1, 2]}}
    assert parse_json_object('{"a": 1, "b": [1, 2,],}') == {"a": 1, "b": [1, 2]}
    assert parse_json_object("{'label': 'French words', 'ok': true}") == {"label": "French words", "ok": True}
    assert parse_json_object('text {not json} then {"x": "}"}') == {"x": "}"}
    for bad in (None, "", "no json here", "[1, 2]", '{"unterminated": ', "{{{{"):
        assert parse_json_object(bad) is None


def test_parse_number_messy() -> None:
    assert parse_number("7", 0, 10) == 7.0
    assert parse_number("**0.85**.", 0, 1) == 0.85
    assert parse_number("Score: 8/10", 0, 10) == 8.0
    assert parse_number("On a scale of 0 to 10, my answer is 6", 0, 10) == 6.0
    assert parse_number("I think about 4 or 5", 0, 10) == 4.0
    assert parse_number(".5", 0, 1) == 0.5
    assert parse_number("42", 0, 10) is None  # out of range: misunderstood, not clamped
    for bad in (None, "", "seven", "nan", "inf"):
        assert parse_number(bad, 0, 10) is None


def test_parse_yes_no_messy() -> None:
    for yes in ("Yes", "yes.", " YES, it does", "**Yes**", "Answer: Yes", "True", "I think yes", "y"):
        assert parse_yes_no(yes) is True, yes
    for no in ("No", "no, never", "Final answer: NO", "false", "n"):
        assert parse_yes_no(no) is False, no
    for unclear in (None, "", "maybe", "N/A", "It depends", "Hard to say: yes or no"):
        assert parse_yes_no(unclear) is None, unclear


def test_parse_completion_shapes() -> None:
    ok = parse_completion('{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], '
                          '"usage": {"prompt_tokens": 4, "completion_tokens": 1}}')
    assert ok.ok and ok.text == "hi" and ok.prompt_tokens == 4 and ok.finish_reason == "stop"
    none = parse_completion('{"choices": [{"message": {"content": null}, "finish_reason": "length"}]}')
    assert none.error and "no message content" in none.error
    assert parse_completion('"just a string"').error
    assert yes_probability(None) is None and yes_probability([{"Maybe": -0.1}]) is None


def test_default_threads_leave_busy_cores_to_other_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import monoscope.interp.llm as llm_mod

    cases = [(2, 0.0, 2), (2, 1.0, 1), (2, 3.0, 1), (16, 3.4, 13), (16, 12.0, 8), (1, 0.0, 1), (2, math.inf, 1)]
    for cores, busy, want in cases:
        monkeypatch.setattr(llm_mod.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        monkeypatch.setattr(llm_mod, "busy_cores", lambda b=busy: b)
        assert llm_mod.default_threads() == want, (cores, busy)


def test_busy_cores_reads_runnable_tasks_less_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import io

    import monoscope.interp.llm as llm_mod

    reads = iter(["1.9 1.5 1.2 3/80 4606\n", "1.9 1.5 1.2 1/80 4607\n", "1.9 1.5 1.2 4/80 4608\n"])
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: io.StringIO(next(reads)) if p == "/proc/loadavg"
                        else real_open(p, *a, **k))
    assert llm_mod.busy_cores(reads=3, gap_s=0) == 2.0  # median of 2, 0, 3 runnable others

    def no_proc(p: str, *a: object, **k: object) -> object:
        raise FileNotFoundError(p)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(llm_mod.os, "getloadavg", lambda: (0.7, 0.5, 0.2))
    assert llm_mod.busy_cores(gap_s=0) == 0.7  # no /proc: the 1-minute load average

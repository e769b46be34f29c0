"""The live panels: "try your own text", search by text and by contrast, and steering, which need the model.

The model (and each SAE on the GPU/CPU) is loaded once, on the first request that needs it, in one worker
thread that then runs every live request in turn: steering installs hooks on the shared model, so two
generations must never overlap, and one thread also keeps each SQLite connection in the thread that
opened it. At most `max_waiting` requests queue behind the running one (more: `Busy`, HTTP 429); a
request waits at most `timeout` seconds (then `Timeout`, HTTP 504), and a generation stops itself at
its deadline or when its client goes away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from monoscope.errors import MonoscopeError
from monoscope.serve.site import Entry, Site


class Busy(MonoscopeError):
    """Too many live requests are waiting."""


class Timeout(MonoscopeError):
    """A live request took longer than the server's timeout."""


@dataclass
class Loaded:
    target: Any
    searcher: Any


class Live:
    def __init__(self, site: Site, *, device: str = "auto", compute_dtype: str = "auto", model: str | None = None,
                 timeout: float = 60.0, max_waiting: int = 2) -> None:
        self.site = site
        self.device, self.compute_dtype, self.model = device, compute_dtype, model
        self.timeout = timeout
        self.max_waiting = max_waiting
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="monoscope-live")
        self._pending = 0
        self._count_lock = threading.Lock()
        self._loaded: dict[str, Loaded] = {}
        self._lm: Any = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the worker thread
    def loaded(self, entry: Entry) -> Loaded:
        """The model, SAE and searcher of `entry` (worker thread only), loaded on first use; every SAE of the
        site shares one model when they read the same one."""
        if entry.name in self._loaded:
            return self._loaded[entry.name]
        from monoscope.features.db import FeatureDB, sae_digest
        from monoscope.interop import load_any
        from monoscope.search.text import Searcher
        from monoscope.steer.intervene import check_pair
        from monoscope.steer.target import Target, open_target

        if self._lm is None:
            t = open_target(entry.sae_dir, model=self.model, device=self.device, compute_dtype=self.compute_dtype,
                            db=entry.db_path)
            self._lm = t.lm
        else:
            sae = load_any(entry.sae_dir).eval().to(self._lm.device)
            t = Target(self._lm, sae, check_pair(self._lm, sae), entry.sae_dir)
            with FeatureDB.open(entry.db_path) as fdb:
                t.max_acts, t.densities = fdb.column("max_act"), fdb.column("density")
            t.db_path = entry.db_path
        fdb = FeatureDB.open(entry.db_path, expect_sae_sha256=sae_digest(entry.sae_dir), sae_dir=entry.sae_dir)
        searcher = Searcher(t.lm, t.sae, fdb, sae_dir=entry.sae_dir)
        self._loaded[entry.name] = Loaded(t, searcher)
        return self._loaded[entry.name]

    def _enter(self) -> None:
        with self._count_lock:
            if self._pending > self.max_waiting:
                raise Busy(f"{self._pending} live requests are already running or waiting: try again in a moment")
            self._pending += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._pending -= 1

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the worker thread, bounded by the queue and the timeout."""
        self._enter()
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(lambda _: self._leave())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
        except TimeoutError:
            raise Timeout(f"the request took more than {self.timeout:g} s (the server's --timeout); it ends in the "
                          "background; try a shorter text") from None

    # ------------------------------------------------------------------ operations (worker thread)
    def activations(self, entry: Entry, text: str, feature: int | None, top: int) -> dict[str, Any]:
        """Per-token activations of `feature` on `text` and the top features of the text by relative activation."""
        s = self.loaded(entry).searcher
        res = s.search_text(text, top=top, evidence=3)
        doc: dict[str, Any] = {"tokens": res.tokens, "hits": [h.to_dict() for h in res.hits], "notes": res.notes}
        if feature is not None:
            ids = s.tokenize([text], ["the text"])[0]
            _, f = next(s.codes([ids]))
            col = f[:, feature].tolist()
            m = s.max_act[feature]
            doc["feature"] = {"id": feature, "acts": [round(float(a), 4) for a in col],
                              "max_act": float(m) if m == m else None}
        return doc

    def ablation(self, entry: Entry, feature: int, token_ids: list[int]) -> dict[str, Any]:
        """`ablation_effect` of `feature` on a context window (`serve/ablate.py`), BOS put first when the
        window lacks it and left out of what is returned."""
        from monoscope.serve.ablate import ablation_effect

        t = self.loaded(entry).target
        bos = t.lm.special_ids()[0]
        lead = 0 if token_ids and token_ids[0] == bos else 1
        ids = torch.tensor([[bos] * lead + list(token_ids)], dtype=torch.int64, device=t.lm.device)
        out = ablation_effect(t.lm, t.sae, t.hook, ids, feature)
        return {k: v[lead:] if isinstance(v, list) else v for k, v in out.items()}

    def search_text(self, entry: Entry, text: str, top: int) -> dict[str, Any]:
        return self.loaded(entry).searcher.search_text(text, top=top).to_dict()

    def contrast(self, entry: Entry, pos: list[str], neg: list[str], top: int) -> dict[str, Any]:
        from monoscope.search.contrast import contrast

        return contrast(self.loaded(entry).searcher, pos, neg, top=top).to_dict()

    # ------------------------------------------------------------------ streamed steering
    async def steer_stream(self, entry: Entry, edits: list[Any], prompt: str, *, max_new_tokens: int,
                           temperature: float, seed: int, is_disconnected: Callable[[], Any]) -> AsyncIterator[dict]:
        """Default then steered continuation of `prompt`, token by token: {"run", "text"} events, then
        {"done": {...}} (the texts and the resolved edits) or {"error": message}."""
        self._enter()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        deadline = time.monotonic() + self.timeout

        def emit(ev: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ev)

        def work() -> None:
            try:
                emit({"done": self._generate_both(entry, edits, prompt, max_new_tokens, temperature, seed, emit,
                                                  stop, deadline)})
            except MonoscopeError as e:
                emit({"error": str(e)})
            except Exception as e:  # anything else: one line to the page, the server keeps running
                emit({"error": f"{type(e).__name__}: {e}"})

        fut = self._pool.submit(work)
        fut.add_done_callback(lambda _: self._leave())
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), max(deadline - time.monotonic(), 0.0) + 5.0)
                except TimeoutError:
                    stop.set()
                    yield {"error": f"generation took more than {self.timeout:g} s (the server's --timeout)"}
                    return
                if await is_disconnected():
                    stop.set()
                    return
                yield ev
                if "done" in ev or "error" in ev:
                    return
        finally:
            stop.set()

    def _generate_both(self, entry: Entry, edits: list[Any], prompt: str, max_new_tokens: int, temperature: float,
                       seed: int, emit: Callable[[dict[str, Any]], None], stop: threading.Event,
                       deadline: float) -> dict[str, Any]:
        from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from monoscope.steer.edits import resolve_edits
        from monoscope.steer.intervene import steer

        t = self.loaded(entry).target
        resolved = resolve_edits(edits, t.sae.cfg.d_sae, t.max_act)
        ids = t.encode(prompt)
        t.check_length(ids.shape[1] + max_new_tokens, "the prompt plus max new tokens")
        tok = t.lm.tokenizer

        class Stream(BaseStreamer):
            def __init__(self, run: str) -> None:
                self.run, self.ids, self.text, self.first = run, [], "", True

            def put(self, value: torch.Tensor) -> None:
                if self.first:  # generate hands the prompt over first
                    self.first = False
                    return
                self.ids += value.reshape(-1).tolist()
                text = tok.decode(self.ids, skip_special_tokens=True)
                if len(text) > len(self.text) and not text.endswith("\ufffd"):
                    emit({"run": self.run, "text": text[len(self.text):]})
                    self.text = text

            def end(self) -> None:
                text = tok.decode(self.ids, skip_special_tokens=True)
                if text != self.text:
                    emit({"run": self.run, "text": text[len(self.text):]})
                    self.text = text

        class Deadline(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
                done = stop.is_set() or time.monotonic() > deadline
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        out: dict[str, Any] = {"prompt": prompt, "seed": seed, "temperature": temperature,
                               "edits": [{**r.spec, "raw_value": r.value} for r in resolved]}
        # the same generate() arguments and seeding as monoscope.steer.generate.side_by_side: a seed gives the
        # text `monoscope steer` prints
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, use_cache=True,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                  attention_mask=torch.ones_like(ids),
                                  stopping_criteria=StoppingCriteriaList([Deadline()]))
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        for run, e in (("default", None), ("steered", edits)):
            stream = Stream(run)
            torch.manual_seed(seed)
            with torch.no_grad(), t.lm.autocast():
                if e is None:
                    t.lm.model.generate(ids, streamer=stream, **kw)
                else:
                    with steer(t.lm, t.sae, e, where="all", prompt_len=ids.shape[1], max_act=t.max_act):
                        t.lm.model.generate(ids, streamer=stream, **kw)
            out[run] = stream.text
            if stop.is_set() or time.monotonic() > deadline:
                out["stopped"] = "deadline or client gone"
                break
        return out

"""The web app: `create_app(path)` returns a FastAPI application over one run folder (or SAE folder).

Pages are rendered on the server from Jinja2 templates (autoescaped: every corpus string is text, never
markup); the one script (`static/app.js`) draws the map and runs the live panels. Every page's data is
also served as JSON (`/sae/NAME/feature/ID.json`, `/api/...`), and the JSON API is described by
`/openapi.json`.

Safety (what `monoscope serve` guarantees, tested in tests/serve):
- a token, when set, is required on every request (`?token=` once, then a cookie; or `Authorization:
  Bearer`); `monoscope serve` sets one whenever it binds to anything but localhost;
- request bodies above MAX_BODY bytes: 413; ids, sizes and numbers validated: 404 for an unknown SAE or
  feature, 422 for a bad parameter; files are served only from names discovered at start-up (no path from a
  request reaches the file system);
- steering strength, new tokens, edits, texts and concurrent live requests bounded (constants below);
  every request ends within its timeout (504);
- Content-Security-Policy without inline scripts, no framing, no referrer, nosniff.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from monoscope.errors import MonoscopeError
from monoscope.serve import views
from monoscope.serve.live import Busy, Live, Timeout
from monoscope.serve.site import Entry, Site

HERE = Path(__file__).resolve().parent
MAX_BODY = 256 * 1024
"""Largest request body (bytes): a contrast of two pasted sets fits, a flood does not."""
MAX_TEXT = 4000
"""Longest text (characters) for live activations, search by text, a prompt or one contrast text."""
MAX_TEXTS = 64
"""Most texts per side of a contrast."""
MAX_NEW_TOKENS = 128
MAX_STRENGTH = 50.0
"""Largest |strength| of a steering edit, in multiples of the feature's max activation."""
MAX_EDITS = 8
MAX_TOP = 100
TOKEN_COOKIE = "monoscope_token"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


# ---------------------------------------------------------------------------------------------- request bodies
class TextRequest(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT, description="text for the model to read")
    top: int = Field(20, ge=1, le=MAX_TOP, description="features to list")


class ActivationsRequest(TextRequest):
    feature: int | None = Field(None, ge=0, description="also return this feature's activation at every token")
    top: int = Field(10, ge=1, le=MAX_TOP)


class ContrastRequest(BaseModel):
    pos: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] = Field(min_length=1, max_length=MAX_TEXTS)
    neg: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] = Field(min_length=1, max_length=MAX_TEXTS)
    top: int = Field(20, ge=1, le=MAX_TOP)


class AblationRequest(BaseModel):
    kind: Literal["top", "quantile"] = Field("top", description="which list of the feature page")
    index: int = Field(0, ge=0, le=200, description="the context's place in that list, as the page shows it")


class EditRequest(BaseModel):
    feature: int = Field(ge=0)
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, description="multiple of the feature's max activation")
    mode: Literal["clamp", "add"] = "clamp"


class SteerRequest(BaseModel):
    edits: list[EditRequest] = Field(min_length=1, max_length=MAX_EDITS)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)


# ---------------------------------------------------------------------------------------------- middleware
class _TooLarge(BaseException):
    """Raised from `receive` past the body limit: a BaseException, so no handler below (FastAPI turns an
    Exception while reading a body into a 400) swallows it before Guard answers 413."""


class Guard:
    """ASGI middleware: token check, body-size limit, page timeout and security headers, before anything else."""

    def __init__(self, app: Any, *, token: str | None, max_body: int, timeout: float) -> None:
        self.app, self.token, self.max_body, self.timeout = app, token, max_body, timeout

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        set_cookie = False
        if self.token is not None:
            given = None
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if given is None:
                qs = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
                if qs.get("token"):
                    given = qs["token"][0]
                    set_cookie = True
            if given is None:
                for part in headers.get("cookie", "").split(";"):
                    k, _, v = part.strip().partition("=")
                    if k == TOKEN_COOKIE:
                        given = v
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                await _plain(send, 401, "a token is required: open the URL monoscope serve printed (it ends in "
                                        "?token=...), or send Authorization: Bearer TOKEN")
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _plain(send, 413, f"request body over {self.max_body} bytes")
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge
            return msg

        started = False

        async def guarded_send(msg: dict[str, Any]) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
                if set_cookie and self.token is not None:
                    extra.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                                                 "Path=/".encode()))
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            await send(msg)

        streaming = scope.get("path", "").endswith("/steer") and scope.get("method") == "POST"
        try:
            if streaming:  # a generation has its own deadline (Live.steer_stream)
                await self.app(scope, limited_receive, guarded_send)
            else:
                await asyncio.wait_for(self.app(scope, limited_receive, guarded_send), self.timeout + 5.0)
        except _TooLarge:
            if not started:
                await _plain(send, 413, f"request body over {self.max_body} bytes")
        except TimeoutError:
            if not started:
                await _plain(send, 504, f"the request took more than {self.timeout:g} s")


async def _plain(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, text: str) -> None:
    body = json.dumps({"detail": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- the app
def create_app(path: str | Path, *, token: str | None = None, device: str = "auto", compute_dtype: str = "auto",
               model: str | None = None, timeout: float = 60.0, max_waiting: int = 2,
               max_body: int = MAX_BODY, coactivation_map: bool | Literal["auto"] = False,
               compare: list[str | Path] | None = None) -> FastAPI:
    """The application over the run folder (or SAE folder) `path`: a one-line `MonoscopeError` when it has no
    SAE with a features database. `token`: required on every request when set. `coactivation_map`: lay out
    each SAE's co-occurrence graph now (`serve/coact.py`; cached) and show it first, beside the decoder map; "auto"
    (what `monoscope serve` passes unless told): the same for SAEs up to coact.AUTO_MAX_FEATURES features, laid
    out in a background thread (or read from the cache) while the server already answers. `compare`:
    SAE folders from elsewhere (another run, each with its features database) served too, so each feature
    page names its best match in every other SAE of the site (decoder cosine)."""
    site = Site(path, compare=compare)
    if coactivation_map == "auto":
        _coactivation_in_background(site)
    elif coactivation_map:
        from monoscope.serve.coact import cached_layout

        for e in site.entries.values():
            e.coact = cached_layout(e.db_path)
    live = Live(site, device=device, compute_dtype=compute_dtype, model=model, timeout=timeout,
                max_waiting=max_waiting)
    app = FastAPI(title="monoscope", version="1", docs_url=None, redoc_url=None,
                  description="Feature pages, search and steering of the SAEs of one run folder.")
    app.state.site, app.state.live = site, live
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["num"] = _num
    templates.env.globals["site"] = site
    templates.env.globals["context_html"] = views.context_html
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(Guard, token=token, max_body=max_body, timeout=timeout)

    def entry_or_404(name: str) -> Entry:
        e = site.entry(name)
        if e is None:
            raise HTTPException(404, f"no SAE named {name!r} here: this site serves {', '.join(site.entries)}")
        return e

    def fid_or_404(e: Entry, fid: int) -> int:
        if not 0 <= fid < e.n_features:
            raise HTTPException(404, f"feature {fid} is out of range: SAE {e.name} has features 0 to "
                                     f"{e.n_features - 1}")
        return fid

    def page(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"request": request, **ctx}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if _wants_html(request):
            return page(request, "error.html", {"status": exc.status_code, "message": exc.detail}, exc.status_code)
        return JSONResponse({"detail": exc.detail}, exc.status_code)

    @app.exception_handler(MonoscopeError)
    async def user_error(request: Request, exc: MonoscopeError) -> Response:
        status = 429 if isinstance(exc, Busy) else 504 if isinstance(exc, Timeout) else 422
        if _wants_html(request):
            return page(request, "error.html", {"status": status, "message": str(exc)}, status)
        return JSONResponse({"detail": str(exc)}, status)

    # ------------------------------------------------------------------ pages
    def sae_page(request: Request, e: Entry, kind: str | None) -> HTMLResponse:
        kind = kind or ("coactivation" if e.coact is not None else "decoder")
        db = e.db()
        interesting = db.most_interesting(30) or db.most_interesting(30, with_examples=True)
        if kind == "coactivation" and e.coact is None:
            raise HTTPException(404, "no co-activation map: start monoscope serve with --coactivation-map")
        return page(request, "run.html", {
            "entry": e, "metrics": views.metrics_summary(e.metrics), "interesting": interesting, "kind": kind})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def run_page(request: Request, map: Literal["decoder", "coactivation"] | None = None) -> HTMLResponse:
        return sae_page(request, site.default, map)

    @app.get("/sae/{name}", response_class=HTMLResponse, include_in_schema=False)
    def sae_overview(request: Request, name: str,
                     map: Literal["decoder", "coactivation"] | None = None) -> HTMLResponse:
        return sae_page(request, entry_or_404(name), map)

    @app.get("/sae/{name}/goto", include_in_schema=False)
    def goto(name: str, id: Annotated[int, Query(ge=0)]) -> RedirectResponse:
        e = entry_or_404(name)
        return RedirectResponse(f"/sae/{e.name}/feature/{fid_or_404(e, id)}", status_code=303)

    @app.get("/sae/{name}/png/{png}", include_in_schema=False)
    def png(name: str, png: str) -> FileResponse:
        e = entry_or_404(name)
        p = e.pngs.get(png)
        if p is None:
            raise HTTPException(404, f"no image {png!r} for SAE {name}")
        return FileResponse(p, media_type="image/png")

    @app.get("/sae/{name}/map.json")
    def feature_map(name: str, kind: Literal["decoder", "coactivation"] = "decoder") -> dict[str, Any]:
        """The interactive map's points [id, x, y, label, density] and its named regions: the decoder map of
        the features pass, or the co-activation map when the server computed it."""
        e = entry_or_404(name)
        if kind == "coactivation":
            if e.coact_data is None:
                raise HTTPException(404, "no co-activation map: start monoscope serve with --coactivation-map")
            return e.coact_data
        return e.map_data

    @app.get("/sae/{name}/feature/{fid}.json")
    def feature_json(name: str, fid: int) -> dict[str, Any]:
        """Everything the feature page shows, as JSON (each context: token texts and their activations)."""
        e = entry_or_404(name)
        t0 = time.perf_counter()
        resp = _json(views.feature_doc(site, e, fid_or_404(e, fid)))
        resp.headers["server-timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
        return resp  # type: ignore[return-value]

    @app.get("/sae/{name}/feature/{fid}", response_class=HTMLResponse, include_in_schema=False)
    def feature_page(request: Request, name: str, fid: int) -> HTMLResponse:
        e = entry_or_404(name)
        t0 = time.perf_counter()
        doc = views.feature_doc(site, e, fid_or_404(e, fid))
        resp = page(request, "feature.html", {"entry": e, "f": doc})
        resp.headers["server-timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
        return resp

    @app.get("/sae/{name}/search", response_class=HTMLResponse, include_in_schema=False)
    async def search_page(request: Request, name: str, q: Annotated[str, Query(max_length=500)] = "",
                          text: Annotated[str, Query(max_length=MAX_TEXT)] = "",
                          mode: Literal["keyword", "semantic", "both"] = "keyword") -> HTMLResponse:
        e = entry_or_404(name)
        ctx: dict[str, Any] = {"entry": e, "q": q, "text": text, "mode": mode, "pos": "", "neg": ""}
        if q.strip():
            ctx["labels"] = await _labels(e, q, 30, mode)
        if text.strip():
            ctx["text_result"] = await live.call(live.search_text, e, text, 20)
        return page(request, "search.html", ctx)

    @app.post("/sae/{name}/search", response_class=HTMLResponse, include_in_schema=False)
    async def contrast_page(request: Request, name: str) -> HTMLResponse:
        e = entry_or_404(name)
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        pos_s, neg_s = form.get("pos", [""])[0], form.get("neg", [""])[0]
        pos = [ln.strip() for ln in pos_s.splitlines() if ln.strip()]
        neg = [ln.strip() for ln in neg_s.splitlines() if ln.strip()]
        body = ContrastRequest.model_validate({"pos": pos, "neg": neg}) if pos and neg else None
        ctx: dict[str, Any] = {"entry": e, "q": "", "text": "", "mode": "keyword", "pos": pos_s, "neg": neg_s}
        if body is None:
            raise HTTPException(422, "a contrast needs texts on both sides: one text per line in each box")
        ctx["contrast"] = await live.call(live.contrast, e, body.pos, body.neg, 20)
        return page(request, "search.html", ctx)

    @app.get("/sae/{name}/steer", response_class=HTMLResponse, include_in_schema=False)
    def steer_page(request: Request, name: str, feature: Annotated[int | None, Query(ge=0)] = None) -> HTMLResponse:
        e = entry_or_404(name)
        label = None
        if feature is not None:
            fid_or_404(e, feature)
            label = (e.db().briefs([feature]).get(feature) or {}).get("label")
        return page(request, "steer.html", {"entry": e, "feature": feature, "label": label,
                                            "max_new_tokens": MAX_NEW_TOKENS, "max_strength": MAX_STRENGTH})

    @app.get("/audit", include_in_schema=False)
    def audit() -> FileResponse:
        if site.audit_report is None:
            raise HTTPException(404, "this run has no audit report (audit/report.html)")
        return FileResponse(site.audit_report, media_type="text/html")

    # ------------------------------------------------------------------ JSON API
    async def _labels(e: Entry, q: str, top: int, mode: str) -> list[dict[str, Any]]:
        from monoscope.search.labels import keyword_search, search_labels

        def keyword() -> list[dict[str, Any]]:
            # keyword_search alone: search_labels would also read every feature's document to show its text,
            # which grows with the SAE; here only the hits are read
            db = e.db()
            ids = keyword_search(db, q, top)
            briefs = db.briefs(ids)
            out = []
            for r, f in enumerate(ids, 1):
                b = briefs.get(f) or {}
                expl = db.latest_explanation(f)
                text = " ; ".join(t for t in (b.get("label"), expl["text"] if expl else None) if t)
                out.append({"feature": f, "keyword_rank": r, "text": text, "density": views._f(b.get("density")),
                            "max_act": views._f(b.get("max_act"))})
            return out

        def fused() -> list[dict[str, Any]]:
            hits = [h.to_dict() for h in search_labels(e.db(), q, top=top, mode=mode)]
            briefs = e.db().briefs([h["feature"] for h in hits])
            for h in hits:
                b = briefs.get(h["feature"]) or {}
                h.update(density=views._f(b.get("density")), max_act=views._f(b.get("max_act")))
            return hits

        if mode == "keyword":
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(keyword)
        return await live.call(fused)  # the embedder is a model: one at a time, in the live worker

    @app.get("/api/site")
    def api_site() -> dict[str, Any]:
        """The SAEs served, with their feature counts and eval numbers."""
        return {"saes": [{"name": e.name, "n_features": e.n_features, "eval": dict(views.metrics_summary(e.metrics)),
                          "model": e.meta.get("model"), "hook": e.meta.get("hook")} for e in site.entries.values()],
                "audit": site.audit_summary}

    @app.get("/api/sae/{name}/labels")
    async def api_labels(name: str, q: Annotated[str, Query(min_length=1, max_length=500)],
                         top: Annotated[int, Query(ge=1, le=MAX_TOP)] = 20,
                         mode: Literal["keyword", "semantic", "both"] = "keyword") -> dict[str, Any]:
        """Features whose label or explanation matches `q`."""
        e = entry_or_404(name)
        return {"hits": await _labels(e, q, top, mode)}

    @app.post("/api/sae/{name}/text")
    async def api_text(name: str, body: TextRequest) -> dict[str, Any]:
        """The features that fire on a text, strongest relative to their own maximum first."""
        e = entry_or_404(name)
        return await live.call(live.search_text, e, body.text, body.top)

    @app.post("/api/sae/{name}/contrast")
    async def api_contrast(name: str, body: ContrastRequest) -> dict[str, Any]:
        """The features that separate two sets of texts."""
        e = entry_or_404(name)
        return await live.call(live.contrast, e, body.pos, body.neg, body.top)

    @app.post("/api/sae/{name}/activations")
    async def api_activations(name: str, body: ActivationsRequest) -> dict[str, Any]:
        """A feature's activation at every token of a text, and the text's top features."""
        e = entry_or_404(name)
        if body.feature is not None:
            fid_or_404(e, body.feature)
        return await live.call(live.activations, e, body.text, body.feature, body.top)

    @app.post("/api/sae/{name}/feature/{fid}/ablation")
    async def api_ablation(name: str, fid: int, body: AblationRequest) -> dict[str, Any]:
        """How much the next-token loss changes at each token of one of the feature's contexts when the feature
        is ablated (its code set to 0 at every position, the SAE error kept): delta = loss ablated - loss
        clean, in nats, per token (none for the first)."""
        import numpy as np

        e = entry_or_404(name)
        fid_or_404(e, fid)
        rec = e.db().packed_examples(fid)
        top, q = views.shown_records(rec) if rec is not None else ([], [])
        rows = top if body.kind == "top" else q
        if body.index >= len(rows):
            raise HTTPException(404, f"feature {fid} shows {len(rows)} {body.kind} contexts: pass index 0 to "
                                     f"{len(rows) - 1}" if len(rows) else f"feature {fid} has no {body.kind} contexts")
        r = rows[body.index]
        ids = [int(i) for i in r["tokens"][: r["ntok"]].astype(np.int64) if i >= 0]
        out = await live.call(live.ablation, e, fid, ids)
        stored = r["acts"][: r["nact"]].astype(np.float64).round(4).tolist()
        texts = [views._visible(t) for t in e.vocab.decode(ids)]
        return {"feature": fid, "kind": body.kind, "index": body.index, "context": int(r["context"]),
                "tokens": texts, "stored_acts": stored, **out}

    @app.post("/api/sae/{name}/steer")
    async def api_steer(request: Request, name: str, body: Annotated[SteerRequest, Body()]) -> StreamingResponse:
        """Default and steered continuations, streamed as newline-delimited JSON events."""
        from monoscope.steer.edits import Edit

        e = entry_or_404(name)
        for ed in body.edits:
            fid_or_404(e, ed.feature)
        edits = [Edit(ed.feature, ed.mode, f"{ed.strength:g}x") for ed in body.edits]
        live._enter()  # refuse now (429) rather than after the response has started
        live._leave()
        gen = live.steer_stream(e, edits, body.prompt, max_new_tokens=body.max_new_tokens,
                                temperature=body.temperature, seed=body.seed, is_disconnected=request.is_disconnected)

        async def lines() -> Any:
            async for ev in gen:
                yield json.dumps(ev) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def _wants_html(request: Request) -> bool:
    p = request.url.path
    return not (p.startswith("/api/") or p.endswith(".json"))


def _coactivation_in_background(site: Site) -> None:
    """Co-activation maps of the site's SAEs up to AUTO_MAX_FEATURES: from the cache now, else laid out one
    after another in a daemon thread (the run page shows each once it is there)."""
    from monoscope.serve.coact import AUTO_MAX_FEATURES, cached_layout, cached_only

    todo = []
    for e in site.entries.values():
        if e.n_features > AUTO_MAX_FEATURES:
            continue
        e.coact = cached_only(e.db_path)
        if e.coact is None:
            e.coact_pending = True
            todo.append(e)

    def work() -> None:
        for e in todo:
            try:
                e.coact = cached_layout(e.db_path)
            except Exception as exc:  # a failed layout only costs the map: the decoder map stays
                print(f"monoscope serve: no co-activation map for {e.name}: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
            finally:
                e.coact_pending = False

    if todo:
        threading.Thread(target=work, name="monoscope-coactivation-map", daemon=True).start()


def _json(doc: dict[str, Any]) -> Response:
    """`doc` serialised directly: it is plain JSON types already (views.py), so FastAPI's generic encoder
    (a walk over ~2,000 token values of a feature page) is skipped."""
    return Response(json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(),
                    media_type="application/json")


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)

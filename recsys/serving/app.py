"""The HTTP ranking service: FastAPI app around a hot-swappable `Scorer`.

Endpoints
    POST /rank      {"user_id": int64, "candidates": [int64, ...], "ts": int?} -> candidates sorted
                    by predicted click probability, with the model version and stage timings
    GET  /healthz   liveness: the process answers
    GET  /readyz    readiness: a model is loaded and the scoring pool accepts work
    GET  /metrics   Prometheus text format

Overload behaviour (see pool.py): at most `max_concurrency` rankings are admitted at once; one
more gets 503 with Retry-After at once rather than waiting in an unbounded queue; a ranking past
`timeout_ms` gets 504. Scoring runs in a thread pool, so the event loop keeps answering health
checks while the CPU works.
"""
from __future__ import annotations

import os

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys.serving.metrics import ServingMetrics
from recsys.serving.pool import DeadlineExceeded, Overloaded, ScoringPool
from recsys.serving.reload import AliasPoller, ModelHolder
from recsys.serving.schemas import ErrorResponse, RankRequest, RankResponse
from recsys.serving.scorer import Scores

log = logging.getLogger(__name__)

RANK_PATH = "/rank"


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the service (all enforced per request).

    max_candidates: most candidates one request may carry (422 above).
    timeout_ms: deadline of one ranking, queueing for a scoring thread included (504 after).
    max_concurrency: rankings admitted at once (503 above).
    max_body_bytes: largest request body accepted (413 above).
    scoring_threads: threads that run the model (and load it, see pool.py).
    torch_threads: torch intra-op threads of each scoring thread; None = the process's CPUs
        divided among the scoring threads, so that no more threads compute than there are cores.
    """

    max_candidates: int = 1000
    timeout_ms: float = 1000.0
    max_concurrency: int = 8
    max_body_bytes: int = 1 << 20
    scoring_threads: int = 1
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_concurrency", "max_body_bytes", "scoring_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")

    def intra_op_threads(self) -> int:
        """torch threads per scoring thread: `torch_threads`, else the CPUs / scoring threads."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, len(os.sched_getaffinity(0)) // self.scoring_threads)
        if self.timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {self.timeout_ms}")


def error_response(status: int, message: str, fields: list[dict[str, str]] | None = None, headers=None) -> JSONResponse:
    body = ErrorResponse(error=message, fields=fields or [])
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class RequestGuard:
    """Outermost ASGI layer: caps the request body (413) and counts /rank answers by status.

    The declared Content-Length is checked before anything is read; a chunked body is counted
    as it streams in and cut off the moment it passes the cap.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServingMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = scope["path"] == RANK_PATH

        async def send_counted(message: Message) -> None:
            if counted and message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send_counted)
            return
        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # FastAPI re-raises HTTPException from body reading; the app's handler answers it.
                    raise HTTPException(413, self._too_large_text())
            return message

        await self.app(scope, receive_capped, send_counted)

    def _too_large_text(self) -> str:
        return f"request body exceeds the limit of {self.max_body_bytes} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.errors.labels(reason="too_large").inc()
        await error_response(413, self._too_large_text())(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, str]]]:
    """One readable sentence plus per-field problems; never echoes the (possibly huge) input."""
    fields = []
    for err in exc.errors()[:20]:
        loc = [str(part) for part in err.get("loc", ())]
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            position = loc[1] if len(loc) > 1 else "?"
            fields.append({"field": "body", "problem": f"body is not valid JSON: {reason} at character {position}"})
            continue
        path = ".".join(loc[1:] if loc and loc[0] == "body" else loc) or "body"
        problem = err.get("msg", "invalid")
        if path == "body" and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
            problem = (
                "the body must be a JSON object with user_id and candidates, "
                "sent with Content-Type: application/json"
            )
        fields.append({"field": path, "problem": problem})
    summary = "; ".join(f"{f['field']}: {f['problem']}" for f in fields[:3])
    if len(fields) > 3:
        summary += f"; and {len(fields) - 3} more"
    return f"invalid request: {summary}", fields


def create_app(
    holder: ModelHolder,
    settings: ServeSettings = ServeSettings(),
    poller: AliasPoller | None = None,
    metrics: ServingMetrics | None = None,
    pool: ScoringPool | None = None,
) -> FastAPI:
    """Build the ranking app around `holder`; `poller` (optional) is started and stopped with it.

    `pool` runs the rankings (default: a new one from `settings`; pass the pool the model was
    loaded on, see `recsys.serving.service`). `metrics` must be the ones that pool reports to.
    """
    metrics = metrics or ServingMetrics()
    metrics.set_model_version(holder.current.version)
    if poller is not None:
        previous_on_swap = poller.on_swap

        def on_swap(scorer) -> None:
            metrics.set_model_version(scorer.version)
            metrics.reloads.labels(result="swapped").inc()
            if previous_on_swap is not None:
                previous_on_swap(scorer)

        poller.on_swap = on_swap
        poller.on_failure = lambda exc: metrics.reloads.labels(result="failed").inc()

    if pool is None:
        pool = ScoringPool(settings.scoring_threads, settings.max_concurrency, settings.timeout_ms / 1000.0,
                           metrics.in_flight)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if poller is not None:
            poller.start()
        try:
            yield
        finally:
            pool.close()
            if poller is not None:
                poller.stop()

    app = FastAPI(
        title="MUSE ranking service",
        description="Ranks candidate items for a user with a MUSE CTR model (GSU + ESU).",
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels(reason="invalid").inc()
        message, fields = _describe_validation(exc)
        return error_response(422, message, fields)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 413:
            metrics.errors.labels(reason="too_large").inc()
        elif exc.status_code == 400:
            metrics.errors.labels(reason="invalid").inc()
            if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's body parser hides the reason
                message = f"the body is not UTF-8 JSON: {exc.__cause__.reason} at byte {exc.__cause__.start}"
        return error_response(exc.status_code, message, headers=exc.headers)

    def invalid_candidates(problem: str) -> JSONResponse:
        """422 for the rules the request model cannot express (they depend on settings or on the whole list)."""
        metrics.errors.labels(reason="invalid").inc()
        return error_response(422, f"invalid request: candidates: {problem}", [{"field": "candidates", "problem": problem}])

    @app.post(
        RANK_PATH,
        response_model=RankResponse,
        responses={
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
            504: {"model": ErrorResponse},
        },
    )
    async def rank(body: RankRequest) -> Response:
        started = time.perf_counter()
        count = len(body.candidates)
        if count > settings.max_candidates:
            return invalid_candidates(f"{count} candidates given, at most {settings.max_candidates} allowed")
        if len(set(body.candidates)) != count:
            return invalid_candidates("candidate ids repeat; send each item once")
        scorer = holder.current  # read once: a hot swap during this request does not affect it
        try:
            result: Scores = await pool.run(scorer.score, body.user_id, body.candidates, body.ts)
        except Overloaded:
            metrics.errors.labels(reason="overloaded").inc()
            problem = (f"server is at its limit of {settings.max_concurrency} concurrent rankings"
                       if pool.accepting else "server is shutting down")
            return error_response(503, f"{problem}; retry shortly", headers={"Retry-After": "1"})
        except DeadlineExceeded:
            metrics.errors.labels(reason="timeout").inc()
            return error_response(504, f"ranking took longer than the {settings.timeout_ms:g} ms deadline")
        except Exception:
            log.exception("scoring failed for user %d with %d candidates", body.user_id, count)
            metrics.errors.labels(reason="internal").inc()
            return error_response(500, "internal error while scoring; see the server log")
        probabilities = np.asarray(result.probabilities, dtype=np.float64)
        if probabilities.shape != (count,) or not np.isfinite(probabilities).all():
            log.error("model %s returned scores of shape %s (finite: %s) for %d candidates",
                      scorer.version, probabilities.shape, np.isfinite(probabilities).all(), count)
            metrics.errors.labels(reason="internal").inc()
            return error_response(500, "the model returned invalid scores; see the server log")
        order = np.argsort(-probabilities, kind="stable")
        timings = result.timings.as_dict()
        elapsed = time.perf_counter() - started
        metrics.latency.observe(elapsed)
        metrics.candidates.observe(count)
        metrics.observe_stages(timings)
        timings["request"] = elapsed * 1000.0
        candidates = body.candidates
        items = [{"item_id": candidates[i], "score": float(probabilities[i])} for i in order.tolist()]
        return JSONResponse(
            {"user_id": body.user_id, "model_version": scorer.version, "items": items, "timings_ms": timings}
        )

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        if not pool.accepting:
            return error_response(503, "server is shutting down")
        return JSONResponse({"status": "ready", "model_version": holder.current.version})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app

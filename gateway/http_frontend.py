"""The HTTP front end: OpenAI's API, tokenize/detokenize, health, metrics and the chat page,
on the gateway's core, in the same process and event loop as gRPC.

    http = HttpFrontend(core, "0.0.0.0:8000")
    port = await http.start()
    ...
    await http.stop(grace_s=25)

FastAPI on uvicorn, served from a socket bound here (a port in use is an OSError naming it,
not a uvicorn exit), with uvicorn's own signal handling off: the gateway process owns SIGTERM
and shuts every front end down together. With --tls-cert the HTTP port serves TLS with the
same certificate (and requires client certificates with --tls-client-ca).

Routes needing an API key (when the gateway has a key file): /v1/*, /tokenize, /detokenize.
Open: /health, /metrics, / and /chat (the page asks for a key when the gateway needs one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import GatewayConfig
from common.errors import ErrorCode, InvalidRequestError
from gateway import context, metrics
from gateway.api_keys import Caller, bearer
from gateway.core import GatewayCore
from gateway.failures import describe
from gateway.openai_format import HTTP_STATUS, error_body, model_list
from gateway.openai_routes import completions, parse
from gateway.openai_schema import DetokenizeRequest, TokenizeRequest

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
          "/health", "/metrics", "/", "/chat")
"""Paths as the request metrics label them (anything else is "other")."""


def build_app(core: GatewayCore) -> FastAPI:
    """The ASGI application over `core`."""
    service = core.service
    app = FastAPI(title="npuserve", summary="OpenAI-compatible API of an npuserve gateway",
                  docs_url="/docs", redoc_url=None)

    app.add_middleware(_Metrics)

    def caller(request: Request) -> Caller:
        return service.authenticate(bearer(request.headers.get("authorization")))

    @app.post("/v1/chat/completions")
    @_guarded
    async def chat_completions(request: Request) -> Response:
        return await completions(request, "chat", service, caller)

    @app.post("/v1/completions")
    @_guarded
    async def text_completions(request: Request) -> Response:
        return await completions(request, "text", service, caller)

    @app.get("/v1/models")
    @_guarded
    async def models(request: Request) -> Response:
        caller(request)
        listed = await service.list_models()
        return JSONResponse(model_list([(m.name, m.max_context) for m in listed]))

    @app.post("/tokenize")
    @_guarded
    async def tokenize(request: Request) -> Response:
        caller(request)
        body = await parse(request, TokenizeRequest)
        result = await service.tokenize(body.model, body.prompt_input())
        meta = core.registry.meta(body.model or core.registry.served()[0])
        return JSONResponse({"count": len(result.token_ids), "tokens": result.token_ids,
                             "token_strs": result.tokens,
                             "max_model_len": meta.max_len if meta else None})

    @app.post("/detokenize")
    @_guarded
    async def detokenize(request: Request) -> Response:
        caller(request)
        body = await parse(request, DetokenizeRequest)
        return JSONResponse({"prompt": await service.detokenize(body.model, body.tokens)})

    @app.get("/health")
    async def health() -> Response:
        serving = [m for m, ok in core.health.models.items() if ok]
        return JSONResponse({"status": "SERVING" if core.serving else "NOT_SERVING",
                             "models": serving}, status_code=200 if core.serving else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def root() -> Response:
        return RedirectResponse("/chat")

    @app.get("/chat")
    async def chat_page() -> Response:
        return HTMLResponse(_chat_page(), headers={"Cache-Control": "no-cache"})

    return app


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """Every failure of `handler` answered with OpenAI's error body and its status."""
    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 -- every failure gets a status and a message
            return error_response(exc, f"{request.method} {request.url.path}")

    return run


class _Metrics:
    """ASGI middleware: a fresh request id per call, and each call counted and timed by
    path (of ROUTES) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context.begin()
        path = scope["path"] if scope["path"] in ROUTES else "other"
        status, started = 500, time.monotonic()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.HTTP_REQUESTS.labels(path, str(status)).inc()
            metrics.HTTP_DURATION.labels(path).observe(time.monotonic() - started)


def error_response(exc: BaseException, where: str) -> JSONResponse:
    """OpenAI's error body and the HTTP status of the failure's neutral code."""
    code, message = describe(exc, where)
    param = getattr(exc, "field", None)
    if isinstance(exc, InvalidRequestError):  # the gRPC API nests sampling fields; here
        param = exc.field.removeprefix("sampling.")  # they are top-level
        message = f"{param}: {exc.message}"
    status, _ = HTTP_STATUS.get(code, HTTP_STATUS[ErrorCode.INTERNAL])
    headers = {"WWW-Authenticate": "Bearer"} if code == ErrorCode.UNAUTHENTICATED else None
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def _chat_page() -> str:
    return (importlib.resources.files("gateway") / "static" / "chat.html").read_text("utf-8")


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway process owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFrontend:
    """One uvicorn server on `listen` serving build_app(core)."""

    def __init__(self, core: GatewayCore, listen: str, config: GatewayConfig | None = None
                 ) -> None:
        self.listen = listen
        self.port = 0
        host, _, port = listen.rpartition(":")
        self._host, self._port = host.strip("[]") or "0.0.0.0", int(port)
        tls: dict[str, object] = {}
        if config is not None and config.tls_cert:
            tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca:
                tls.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.tls = bool(tls)
        self._config = uvicorn.Config(build_app(core), log_config=None, access_log=False,
                                      lifespan="off", server_header=False,
                                      **tls)  # type: ignore[arg-type]
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind, start serving and return the bound port (useful with port 0)."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen for HTTP on {self.listen}: {exc}") from exc
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the HTTP server on {self.listen} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP (OpenAI API, chat page) on %s (port %d, %s)", self.listen, self.port,
                 "TLS" if self.tls else "plaintext")
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, give open requests `grace_s` to finish, then cancel them."""
        if self._task is None:
            return
        self._config.timeout_graceful_shutdown = max(1, round(grace_s))
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

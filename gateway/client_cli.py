"""`npuserve client`: stream a reply, a raw completion, or hold a chat, against a gateway.

    npuserve client "What is the capital of France?"   # one user turn, with the chat template
    npuserve client --raw "The capital of France is"  # plain completion of the text (Generate)
    npuserve client --chat                  # one user turn per stdin line; /exit or EOF ends
    echo "Summarise: ..." | npuserve client --json -   # the prompt from stdin, JSON out

Text goes to stdout as it arrives; with -v, usage and timings go to stderr at the end; with
--json, one JSON object at the end instead (text, token ids, finish reason, usage, timings,
and log-probabilities with --logprobs). A gRPC error prints its status code name and the
server's message and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from common.config import env
from common.errors import InvalidRequestError

if TYPE_CHECKING:
    from gateway.client import StreamResult

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def register(subparsers: Any) -> None:
    """Add `client` to the root parser's subparsers."""
    p = subparsers.add_parser(
        "client",
        help="stream a reply or a completion from a running gateway",
        description="Stream the model's reply to PROMPT (one user turn through the chat "
                    "template), a plain completion of it with --raw, or with --chat hold a "
                    "conversation from stdin lines, printing text as it arrives.",
    )
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="the user's message; with --raw, text to complete; with --chat, "
                        "the first user turn (optional). '-' reads it from stdin")
    p.add_argument("--raw", action="store_true",
                   help="complete PROMPT as plain text (Generate) instead of replying to it")
    p.add_argument("--target", default=env("CLIENT_TARGET", "127.0.0.1:50051"),
                   help="gateway host:port (default 127.0.0.1:50051, env NPUSERVE_CLIENT_TARGET)")
    p.add_argument("--chat", action="store_true",
                   help="chat: read user turns from stdin, keep the history; /exit or EOF ends")
    p.add_argument("--health", action="store_true",
                   help="only check grpc.health.v1: print the status, exit 0 when SERVING "
                        "(for container healthchecks)")
    p.add_argument("--service", default="",
                   help="with --health: the service to check (default \"\": the server)")
    p.add_argument("--system", default="", help="a system message to start the chat with")
    p.add_argument("--model", default="", help="model name (default: the only served model)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="most tokens to generate (default 0: the gateway's default)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: the server's, 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the output before TEXT (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="return each token's log-probability and the N (0-20) most likely "
                        "alternatives (shown with --json)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per reply at its end instead of streaming text")
    p.add_argument("--priority", type=int, default=0, help="0 (lowest, default) to 9")
    p.add_argument("--timeout", type=float, default=None,
                   help="deadline of each call in seconds (default 300, 5 with --health; "
                        "0 for none)")
    p.add_argument("--tls-ca", default=env("CLIENT_TLS_CA", ""),
                   help="connect over TLS, trusting this PEM CA bundle (NPUSERVE_CLIENT_TLS_CA)")
    p.add_argument("--tls-cert", default=env("CLIENT_TLS_CERT", ""),
                   help="client certificate for a gateway that requires one (mutual TLS; "
                        "NPUSERVE_CLIENT_TLS_CERT)")
    p.add_argument("--tls-key", default=env("CLIENT_TLS_KEY", ""),
                   help="key of --tls-cert (NPUSERVE_CLIENT_TLS_KEY)")
    p.add_argument("--api-key-file", default=env("API_KEY_FILE", ""),
                   help="file holding the API key to send (NPUSERVE_API_KEY_FILE); else "
                   "NPUSERVE_API_KEY, if set. Never on the command line, where `ps` shows it")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print request id, usage and timings to stderr at the end")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import grpc

    from gateway.client import GenerationClient, sampling

    credentials = _credentials(args)
    if args.health:
        return _health(args.target, args.service, args.timeout or 5.0, credentials)
    if args.raw and args.chat:
        print("npuserve client: --raw and --chat exclude each other", file=sys.stderr)
        return EXIT_ERROR
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    if not args.chat and args.prompt is None:
        print("npuserve client: PROMPT is required (or '-' to read it from stdin, or --chat)",
              file=sys.stderr)
        return EXIT_ERROR
    if args.prompt is not None and not args.prompt.strip():
        print("npuserve client: PROMPT is empty; give the model something to answer",
              file=sys.stderr)
        return EXIT_ERROR
    fields: dict[str, Any] = {
        "model": args.model, "max_tokens": args.max_tokens, "priority": args.priority,
        "stop": args.stop,
        "sampling": sampling(temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k or 0, seed=args.seed)}
    if args.logprobs is not None:
        fields.update(logprobs=True, top_logprobs=args.logprobs)
    show = _show_json if args.json else _print_stream
    timeout = 300.0 if args.timeout is None else args.timeout or None
    client = GenerationClient(args.target, timeout=timeout, credentials=credentials,
                              api_key=_api_key(args.api_key_file))
    stream: Any = None
    try:
        if args.raw:
            stream = client.generate(args.prompt, **fields)
            result = show(stream, sys.stdout)
            return _finish(result, args.verbose)
        history: list[dict[str, str]] = (
            [{"role": "system", "content": args.system}] if args.system else [])
        turns = _user_turns(args.prompt, sys.stdin) if args.chat else iter([args.prompt])
        for line in turns:
            history.append({"role": "user", "content": line})
            stream = client.chat(history, **fields)
            result = show(stream, sys.stdout)
            stream = None
            if (code := _finish(result, args.verbose)) != 0:
                return code
            history.append({"role": "assistant", "content": result.text})
        return 0
    except grpc.RpcError as exc:
        code_name = exc.code().name if exc.code() is not None else "UNKNOWN"
        print(f"npuserve client: {code_name}: {exc.details()}", file=sys.stderr)
        if code_name == "UNAVAILABLE" and _unreachable(exc.details() or ""):
            print(f"npuserve client: is a gateway running at {args.target}?", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Cancelling the call makes the gateway cancel the request, freeing the worker's slot.
        if stream is not None:
            stream.cancel()
        print("npuserve client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _unreachable(details: str) -> bool:
    """Whether an UNAVAILABLE came from gRPC failing to reach the gateway (not from the
    gateway, which then names what it lacks: Redis, a worker)."""
    lowered = details.lower()
    return ("failed to connect" in lowered or "connection refused" in lowered
            or "dns resolution failed" in lowered) and "redis" not in lowered


def _show_json(stream: Any, out: TextIO) -> StreamResult:
    """Collect the whole reply, then print it as one JSON object."""
    import json

    from gateway.client import StreamResult

    result = StreamResult()
    messages = []
    for message in stream:
        result.add(message)
        messages.append(message)
    reply: dict[str, Any] = {
        "request_id": result.request_id, "text": result.text, "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.prompt_tokens,
                  "completion_tokens": result.completion_tokens},
        "timings": {"queue_wait_ms": result.queue_wait_ms,
                    "time_to_first_token_ms": result.time_to_first_token_ms,
                    "total_ms": result.total_ms}}
    if any(m.logprobs for m in messages):
        reply["logprobs"] = [
            {"token": token, "logprob": lp,
             "top": [{"token": t, "logprob": tlp} for t, tlp in zip(top.tokens, top.logprobs,
                                                                      strict=False)]
             if i < len(m.top_logprobs) and (top := m.top_logprobs[i]) else []}
            for m in messages for i, (token, lp) in enumerate(zip(m.tokens, m.logprobs,
                                                                   strict=False))]
    if result.error:
        reply["error"] = result.error
    out.write(json.dumps(reply, ensure_ascii=False) + "\n")
    out.flush()
    return result


def _api_key(path: str) -> str | None:
    """The key in `path` (its first line), else NPUSERVE_API_KEY, else None."""
    if not path:
        return os.environ.get("NPUSERVE_API_KEY") or None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidRequestError("api_key_file", f"cannot read {path}: {exc.strerror}"
                                  ) from None
    return lines[0].strip() if lines and lines[0].strip() else None


def _credentials(args: argparse.Namespace) -> Any:
    """TLS channel credentials when any --tls-* flag is given; None for plaintext."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    from gateway.tls import channel_credentials

    return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def _health(target: str, service: str, timeout: float, credentials: Any = None) -> int:
    import grpc

    from gateway.client import GenerationClient

    with GenerationClient(target, credentials=credentials) as client:
        try:
            status = client.health(service, timeout=timeout)
        except grpc.RpcError as exc:
            print(f"npuserve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_ERROR
    print(status)
    return 0 if status == "SERVING" else EXIT_ERROR


def _user_turns(first: str | None, stdin: TextIO) -> Iterator[str]:
    """The first turn from the command line (if any), then one per stdin line."""
    interactive = stdin.isatty()
    if first:
        yield first
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text:
            yield text


def _print_stream(stream: Any, out: TextIO) -> StreamResult:
    from gateway.client import StreamResult

    result = StreamResult()
    try:
        for message in stream:
            result.add(message)
            if message.text:
                out.write(message.text)
                out.flush()
    finally:
        # End the line even when the stream fails midway, so an error starts on its own line.
        if result.text or not sys.exc_info()[0]:
            out.write("\n")
            out.flush()
    return result


def _finish(result: StreamResult, verbose: bool) -> int:
    """Report usage when asked; 0 for a completed stream, 1 when it ended in failure."""
    if verbose:
        rate = (result.completion_tokens / (result.total_ms - result.time_to_first_token_ms)
                * 1000 if result.total_ms > result.time_to_first_token_ms else 0.0)
        print(f"[{result.request_id}] finish={result.finish_reason or '?'} "
              f"prompt_tokens={result.prompt_tokens} "
              f"completion_tokens={result.completion_tokens} "
              f"queue={result.queue_wait_ms:.1f}ms ttft={result.time_to_first_token_ms:.1f}ms "
              f"total={result.total_ms:.1f}ms decode={rate:.1f} tok/s", file=sys.stderr)
    if result.finish_reason in ("error", "deadline", "cancelled"):
        detail = f": {result.error}" if result.error else ""
        print(f"npuserve client: request ended with {result.finish_reason}{detail}",
              file=sys.stderr)
        return EXIT_ERROR
    return 0

"""`npuserve client` against a scripted in-test gRPC server (and against nothing at all).

The server here is a stand-in that replays fixed replies and records what it was sent, so these
tests pin down the command's own behaviour: streaming, the chat history, -v, and how errors
reach the terminal. The real gateway is exercised in tests/serving.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from common.cli import main
from protos import npuserve_pb2 as pb
from protos import npuserve_pb2_grpc as pb_grpc
from worker.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class ScriptedGeneration(pb_grpc.GenerationServicer):
    """Streams "Hello, world" in three pieces; Chat answers "reply N" and records the history."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.chats: list[list[tuple[str, str]]] = []
        self.fail_with: tuple[grpc.StatusCode, str] | None = None
        self.finish_error = ""

    def Generate(self, request: pb.GenerateRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        if self.fail_with is not None:
            context.abort(*self.fail_with)
        pieces = ["Hello", ",", " world"]
        for i, text in enumerate(pieces[:-1]):
            yield pb.GenerateResponse(request_id="r1", text=text, token_ids=[10 + i], index=i)
        last = pb.GenerateResponse(
            request_id="r1", text=pieces[-1], token_ids=[12], index=2,
            finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=4,
                                                                  completion_tokens=3),
            timings=pb.Timings(queue_wait_ms=1.5, time_to_first_token_ms=20, total_ms=50))
        if self.finish_error:
            last.finish_reason, last.error = pb.FINISH_REASON_ERROR, self.finish_error
        yield last

    def Chat(self, request: pb.ChatRequest,
             context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.chats.append([(m.role, m.content) for m in request.messages])
        yield pb.GenerateResponse(request_id="c", text=f"reply {len(self.chats)}", index=0,
                                  finish_reason=pb.FINISH_REASON_STOP)


@pytest.fixture
def server() -> Iterator[tuple[str, ScriptedGeneration]]:
    servicer = ScriptedGeneration()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GenerationServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", servicer
    grpc_server.stop(grace=None)


def test_no_server_prints_unavailable_and_exits_nonzero(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert main(["client", "--target", target, "--timeout", "5", "hi"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and target in err
    assert f"is a gateway running at {target}?" in err
    assert "Traceback" not in err


def test_prompt_is_required_without_chat(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "--target", "127.0.0.1:1"]) == 1
    assert "PROMPT is required" in capsys.readouterr().err


def test_an_empty_prompt_is_refused_like_the_server_does(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["client", "--target", "127.0.0.1:1", "  "]) == 1
    assert "PROMPT is empty" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["client", "--target", "127.0.0.1:1", "-"]) == 1
    assert "PROMPT is empty" in capsys.readouterr().err


def test_the_prompt_comes_from_stdin_and_json_carries_the_whole_reply(
        server: tuple[str, ScriptedGeneration], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    target, servicer = server
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi\nfrom stdin\n"))
    code = main(["client", "--target", target, "--raw", "--json", "--stop", "END",
                 "--stop", "STOP", "--top-k", "5", "--logprobs", "2", "-"])
    assert code == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["text"] == "Hello, world" and reply["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
    assert reply["token_ids"] == [10, 11, 12]
    [request] = servicer.requests
    assert request.text == "Say hi\nfrom stdin\n" and list(request.stop) == ["END", "STOP"]
    assert request.sampling.top_k == 5 and request.logprobs and request.top_logprobs == 2


def test_an_unavailable_gateway_is_not_blamed_on_the_connection(
        server: tuple[str, ScriptedGeneration], capsys: pytest.CaptureFixture[str]) -> None:
    target, servicer = server
    servicer.fail_with = (grpc.StatusCode.UNAVAILABLE, "Redis at redis://127.0.0.1:1/0 is "
                          "unreachable (Error 111 connecting to 127.0.0.1:1)")
    assert main(["client", "--target", target, "--raw", "x"]) == 1
    err = capsys.readouterr().err
    assert "Redis at" in err and "is a gateway running" not in err


def test_streams_text_and_sends_the_flags(server: tuple[str, ScriptedGeneration],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target, servicer = server
    code = main(["client", "--target", target, "--raw", "--max-tokens", "3", "--temperature",
                 "0", "--seed", "7", "--priority", "5", "--model", "m", "Say hi"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello, world\n"
    assert captured.err == ""
    [request] = servicer.requests
    assert (request.text, request.max_tokens, request.priority, request.model) == (
        "Say hi", 3, 5, "m")
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
    assert request.sampling.seed == 7
    assert not request.sampling.HasField("top_p")


def test_verbose_prints_usage_and_timings(server: tuple[str, ScriptedGeneration],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target, _ = server
    assert main(["client", "--target", target, "--raw", "-v", "x"]) == 0
    err = capsys.readouterr().err
    for part in ("[r1]", "finish=length", "prompt_tokens=4", "completion_tokens=3",
                 "queue=1.5ms", "ttft=20.0ms", "total=50.0ms"):
        assert part in err


def test_server_error_prints_code_and_message(server: tuple[str, ScriptedGeneration],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    target, servicer = server
    servicer.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "top_p: must be in (0, 1], got 2")
    assert main(["client", "--target", target, "--raw", "--top-p", "2", "x"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT: top_p: must be in (0, 1], got 2" in err
    assert "Traceback" not in err


def test_stream_ending_in_error_exits_nonzero(server: tuple[str, ScriptedGeneration],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    target, servicer = server
    servicer.finish_error = "worker lost the request"
    assert main(["client", "--target", target, "--raw", "x"]) == 1
    assert "ended with error: worker lost the request" in capsys.readouterr().err


def test_a_prompt_is_sent_as_one_user_turn_of_a_chat(server: tuple[str, ScriptedGeneration],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    target, servicer = server
    assert main(["client", "--target", target, "--system", "be brief", "你好"]) == 0
    assert capsys.readouterr().out == "reply 1\n"
    assert servicer.chats == [[("system", "be brief"), ("user", "你好")]]
    assert servicer.requests == []


def test_chat_keeps_the_history_until_exit(server: tuple[str, ScriptedGeneration],
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    target, servicer = server
    monkeypatch.setattr("sys.stdin", io.StringIO("second\n\n/exit\nnever sent\n"))
    assert main(["client", "--target", target, "--chat", "--system", "be brief", "first"]) == 0
    assert capsys.readouterr().out == "reply 1\nreply 2\n"
    assert servicer.chats == [
        [("system", "be brief"), ("user", "first")],
        [("system", "be brief"), ("user", "first"), ("assistant", "reply 1"),
         ("user", "second")],
    ]


def test_chat_ends_at_eof(server: tuple[str, ScriptedGeneration],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    target, servicer = server
    monkeypatch.setattr("sys.stdin", io.StringIO("only\n"))
    assert main(["client", "--target", target, "--chat"]) == 0
    assert servicer.chats == [[("user", "only")]]


def test_health_reports_serving(server: tuple[str, ScriptedGeneration],
                                capsys: pytest.CaptureFixture[str]) -> None:
    target, _ = server
    assert main(["client", "--target", target, "--health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert main(["client", "--target", target, "--health", "--service", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_the_client_library_loads_no_engine_torch_or_tokenizer() -> None:
    # A fresh interpreter: this test process has long imported torch for other tests.
    probe = ("import sys, gateway.client, gateway.client_cli\n"
             "heavy = ('torch', 'transformers', 'tokenizers', 'worker', 'redis')\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]", f"importing the client loaded: {out.strip()}"

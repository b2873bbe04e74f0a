"""Session fixtures shared by the whole suite: the Qwen tokenizer and model checkpoints.

Built checkpoints are cached across sessions under `.cache/test-models/<name>-<key>/`, where
the key holds the builder's version constant and the transformers version, so a changed
builder rebuilds and an unchanged one costs nothing. Several pytest processes may start at
once: a file lock per cache entry makes one build while the others wait, and builders rename
a finished directory into place, so a half-written model is never seen.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "test-models"
DEFAULT_SMOLLM2_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_build(
    name: str, key: str, is_built: Callable[[Path], bool], build: Callable[[Path], object]
) -> Path:
    """Return `.cache/test-models/<name>-<key>`, building it under a lock if it is missing."""
    target = CACHE_DIR / f"{name}-{key}"
    if is_built(target):
        return target
    with _file_lock(CACHE_DIR / f".{name}-{key}.lock"):
        if not is_built(target):
            build(target)
    return target


def _transformers_key() -> str:
    return "tf" + importlib.metadata.version("transformers")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """A directory with Qwen3's tokenizer.json and tokenizer_config.json."""
    from worker.checkpoints.atomic import atomic_directory
    from worker.checkpoints.qwen_tokenizer import QWEN_TOKENIZER_VERSION, build_qwen_tokenizer

    def build(target: Path) -> None:
        with atomic_directory(target) as tmp:
            build_qwen_tokenizer(tmp)

    def is_built(path: Path) -> bool:
        return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()

    return cached_build("qwen-tokenizer", f"v{QWEN_TOKENIZER_VERSION}", is_built, build)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[..., Path]:
    """Factory `(arch, seed=0) -> Path` of a tiny random checkpoint ("qwen3", "qwen2", "llama")."""
    from worker.checkpoints.atomic import is_complete_model
    from worker.checkpoints.qwen_tokenizer import QWEN_TOKENIZER_VERSION
    from worker.checkpoints.tiny import TINY_VERSION, build_tiny_checkpoint

    def get(arch: str, seed: int = 0) -> Path:
        key = f"s{seed}-v{TINY_VERSION}-tok{QWEN_TOKENIZER_VERSION}-{_transformers_key()}"
        return cached_build(
            f"tiny-{arch}",
            key,
            is_complete_model,
            lambda target: build_tiny_checkpoint(target, arch, seed),  # type: ignore[arg-type]
        )

    return get


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_dir: Callable[..., Path]) -> Path:
    """Tiny random Qwen3: q/k norms, head_dim 32 != hidden/heads, untied embeddings."""
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_dir: Callable[..., Path]) -> Path:
    """Tiny random Qwen2: q/k/v biases, tied embeddings."""
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir: Callable[..., Path]) -> Path:
    """Tiny random Llama with the Qwen tokenizer, untied embeddings, rope_theta 10000."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct in float32 safetensors: `models/smollm2-135m-instruct` when
    `make setup` built it, else extracted once into the test cache (about a minute)."""
    from worker.checkpoints.atomic import is_complete_model

    if (DEFAULT_SMOLLM2_DIR / "config.json").is_file():
        return DEFAULT_SMOLLM2_DIR
    from worker.checkpoints.smollm2 import SMOLLM2_VERSION, extract_smollm2

    return cached_build(
        "smollm2-135m-instruct",
        f"v{SMOLLM2_VERSION}-{_transformers_key()}",
        is_complete_model,
        extract_smollm2,
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own on a free loopback port; yields its URL.

    Never the machine's port 6379. Stopped by PID at the end of the session.
    """
    import shutil
    import signal
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; run `make setup`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture
def user_url(redis_url: str) -> Iterator[str]:
    """A Redis ACL user `npuserve-test` with password 'secret' on the session's Redis; the
    URL names the user, not the password. Removed after the test."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("npuserve-test", enabled=True, passwords=["+secret"], keys=["*"],
                      channels=["*"], commands=["+@all"])
    yield redis_url.replace("redis://", "redis://npuserve-test@")
    admin.acl_deluser("npuserve-test")
    admin.close()

"""`npuserve model bmodel`: a Hugging Face Qwen/Llama checkpoint compiled for the BM1684X.

tpu-mlir's `llm_convert.py` writes one bmodel holding a net per step of the vendor's protocol:
`embedding` and `block_i` for a prompt of up to SEQLEN tokens, `embedding_cache` and
`block_cache_i` for one token at a time against the KV rows, `lm_head` (logits with
`--do_sample`, else an on-chip top-1), and `greedy_head` / `sample_head`. Batch 1, static
SEQLEN: a KV slot is a whole sequence.

Next to the bmodel the output directory gets what a worker needs without the source
checkpoint: its config and tokenizer files, and `npuserve-bmodel.json`, the manifest (SEQLEN,
quantization, where sampling happens, every net's inputs and outputs as `model_tool --info`
reports them, device memory, tpu-mlir version, and a digest of the source weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ModelConfigError
from preprocess.tokenizer import TOKENIZER_FILES
from worker.checkpoints.tpu_toolchain import TPU_MLIR_VERSION, Toolchain

log = logging.getLogger(__name__)
BATCHED_CONVERTER = Path(__file__).with_name("llm_convert_batched.py")

QUANTS = ("bf16", "w8bf16", "w4bf16")
MANIFEST = "npuserve-bmodel.json"
CHIP = "bm1684x"

_NET = re.compile(r"^net \d+: \[(?P<name>[^\]]+)\]\s+(?P<kind>static|dynamic)")
_TENSOR = re.compile(r"^(?P<io>input|output): (?P<name>[^,]+), \[(?P<shape>[^\]]*)\], "
                     r"(?P<dtype>\w+)")
_DEVICE_MEM = re.compile(r"^device mem size: (?P<bytes>\d+)")


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    """Static dims, or the maximum of each dim of a dynamic net (`max:N`)."""
    dtype: str


@dataclass(slots=True)
class Net:
    name: str
    dynamic: bool
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BmodelInfo:
    nets: dict[str, Net]
    device_mem_bytes: int


def parse_model_info(text: str) -> BmodelInfo:
    """The nets of `model_tool --info` output, with their tensors (first stage only)."""
    nets: dict[str, Net] = {}
    current: Net | None = None
    device_mem = 0
    for line in text.splitlines():
        if m := _NET.match(line):
            current = nets[m["name"]] = Net(m["name"], m["kind"] == "dynamic")
        elif (m := _TENSOR.match(line)) and current is not None:
            dims = tuple(int(d.strip().removeprefix("max:")) for d in m["shape"].split(",")
                         if d.strip())
            tensors = current.inputs if m["io"] == "input" else current.outputs
            if all(t.name != m["name"] for t in tensors):  # later stages repeat them
                tensors.append(Tensor(m["name"].strip(), dims, m["dtype"]))
        elif m := _DEVICE_MEM.match(line):
            device_mem = int(m["bytes"])
    return BmodelInfo(nets, device_mem)


def required_nets(num_layers: int) -> list[str]:
    """The nets the decode protocol calls, whatever the sampling mode."""
    blocks = [f"block_{i}" for i in range(num_layers)]
    caches = [f"block_cache_{i}" for i in range(num_layers)]
    return ["embedding", "embedding_cache", "lm_head", *blocks, *caches]


def check_nets(info: BmodelInfo, config: dict[str, Any], seqlen: int, sample_on_host: bool,
               decode_batch: int = 1) -> None:
    """Raise ModelConfigError unless the bmodel has the layout the protocol expects."""
    missing = [n for n in required_nets(int(config["num_hidden_layers"])) if n not in info.nets]
    if missing:
        raise ModelConfigError(f"the bmodel lacks nets {', '.join(missing)}")
    logits = info.nets["lm_head"].outputs[0]
    vocab = int(config["vocab_size"])
    if sample_on_host and logits.shape[-1] != vocab:
        raise ModelConfigError(f"lm_head returns {logits.shape}, not logits over {vocab} tokens")
    if info.nets["embedding"].inputs[0].shape != (1, seqlen):
        raise ModelConfigError(
            f"embedding takes {info.nets['embedding'].inputs[0].shape}, not [1, {seqlen}]")
    decode = {t.name: t.shape for t in info.nets["block_cache_0"].inputs}
    outputs = [t.name for t in info.nets["block_cache_0"].outputs]
    if (decode.get("history_k", (0, 0))[:2] != (decode_batch, seqlen)
            or decode.get("attention_mask", (0,))[-1] != seqlen + 1
            or outputs != ["output_states", "k_cache", "v_cache"]):
        raise ModelConfigError(
            f"block_cache_0 takes {decode} and returns {outputs}: not the decode layout of "
            f"{decode_batch} sequence(s) of SEQLEN {seqlen} the protocol drives")


def source_digest(model_dir: Path) -> str:
    """sha256 over the checkpoint's config and weight files, to tie a bmodel to its source."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def compile_bmodel(model_dir: Path, out: Path, *, seqlen: int, quant: str,
                   sample_on_host: bool, toolchain: Toolchain, decode_batch: int = 1
                   ) -> dict[str, Any]:
    """Compile `model_dir` into `out`; returns the manifest written there. Nothing is done
    when `out` already holds this checkpoint (by hash) compiled with these options by this
    tpu-mlir version. With decode_batch B > 1 the decode nets step B sequences at once
    (llm_convert_batched.py: tpu-mlir's own `-b` output does not work)."""
    if quant not in QUANTS:
        raise ModelConfigError(f"quantization {quant!r} is not one of {', '.join(QUANTS)}")
    config = json.loads((model_dir / "config.json").read_text())
    if seqlen < 2 or seqlen > int(config.get("max_position_embeddings", seqlen)):
        raise ModelConfigError(f"--seqlen {seqlen} must be in [2, the model's "
                               f"max_position_embeddings {config.get('max_position_embeddings')}]")
    if decode_batch < 1:
        raise ModelConfigError(f"--decode-batch {decode_batch} must be >= 1")
    digest = source_digest(model_dir)
    options = {"seqlen": seqlen, "quant": quant, "sample_on_host": sample_on_host,
               "decode_batch": decode_batch,
               "tpu_mlir_version": TPU_MLIR_VERSION, "source_sha256": digest}
    if (current := _up_to_date(out, options)) is not None:
        log.info("%s is up to date (same checkpoint, options and tpu-mlir %s): not compiling",
                 out / current["bmodel"], TPU_MLIR_VERSION)
        return current
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.bmodel"):
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="npuserve-bmodel-") as tmp:
        source = _as_bf16(model_dir, Path(tmp), config)
        args = ["-m", str(source), "-s", str(seqlen), "-q", quant, "-c", CHIP,
                "-o", str(out.resolve())]
        if sample_on_host:
            args.append("--do_sample")
        command = toolchain.command("llm_convert.py", *args)
        if decode_batch > 1:
            command = [str(toolchain.bin / "python"), str(BATCHED_CONVERTER), *args,
                       "-b", str(decode_batch)]
        _run_with_progress(toolchain, command, out / "compile.log", cwd=Path(tmp))
    bmodels = sorted(out.glob("*.bmodel"), key=lambda p: p.stat().st_mtime)
    if not bmodels:
        raise ModelConfigError(f"llm_convert.py wrote no .bmodel into {out}; see "
                               f"{out / 'compile.log'}")
    bmodel = bmodels[-1]
    info_text = subprocess.run(toolchain.command("model_tool", "--info", str(bmodel)),
                               env=toolchain.environment(), check=True, capture_output=True,
                               text=True).stdout
    info = parse_model_info(info_text)
    check_nets(info, config, seqlen, sample_on_host, decode_batch)
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    manifest = {
        "bmodel": bmodel.name, "chip": CHIP, "seqlen": seqlen, "quant": quant,
        "sample_on_host": sample_on_host, "decode_batch": decode_batch,
        "tpu_mlir_version": TPU_MLIR_VERSION,
        "num_layers": int(config["num_hidden_layers"]), "vocab_size": int(config["vocab_size"]),
        "device_mem_bytes": info.device_mem_bytes, "source": str(model_dir.resolve()),
        "source_sha256": digest,
        "nets": {name: asdict(net) for name, net in info.nets.items()},
    }
    text = json.dumps(manifest, indent=1)
    (out / MANIFEST).write_text(text + "\n")
    return dict(json.loads(text))  # as a reader of the file sees it (lists, not tuples)


def _up_to_date(out: Path, options: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest in `out` if it was compiled with exactly `options` and its bmodel is there."""
    try:
        manifest: dict[str, Any] = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    same = all(manifest.get(k) == v for k, v in options.items())
    return manifest if same and (out / str(manifest.get("bmodel"))).is_file() else None


def _as_bf16(model_dir: Path, tmp: Path, config: dict[str, Any]) -> Path:
    """The checkpoint itself, or a bfloat16 copy of it: the converter refuses float32."""
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype in ("bfloat16", "float16"):
        return model_dir
    log.info("the checkpoint is %s; saving a bfloat16 copy for the converter", dtype)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    copy = tmp / model_dir.name  # the converter names the bmodel after this directory
    model.save_pretrained(copy)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, copy / name)
    return copy


def _run_with_progress(toolchain: Toolchain, cmd: list[str], log_path: Path, cwd: Path) -> None:
    """Run a tool, its output to `log_path`, printing its stage lines and the elapsed time."""
    started = time.monotonic()
    with log_path.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=toolchain.environment(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            stage = line.strip()
            if stage.startswith(("generate ", "Success", "[INFO]")):
                print(f"[{time.monotonic() - started:5.0f} s] {stage[:120]}", file=sys.stderr,
                      flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise ModelConfigError(f"llm_convert.py failed (exit {code}); the end of "
                               f"{log_path}:\n{tail}")

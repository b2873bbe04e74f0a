"""csrc/kernels.h is the ABI and abi.py its one Python mirror: the two agree function by
function and field by field, and a library built from another ABI is refused."""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_settings import TorchSettings
from worker.kernels import abi, build, cpu
from worker.model.ops import DecoderOps

HEADER = (build.SOURCE_DIR / "kernels.h").read_text()
_CODE = re.sub(r"/\*.*?\*/|//[^\n]*|^#[^\n]*", "", HEADER, flags=re.DOTALL | re.MULTILINE)
_STRUCT = re.compile(r"typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;", re.DOTALL)
_FUNCTION = re.compile(r"([\w\s*]+?)\s*\b(\w+)\s*\(([^)]*)\)\s*;")
_SCALARS: dict[str, type | None] = {"void": None, "int": ctypes.c_int,
                                    "int64_t": ctypes.c_int64, "float": ctypes.c_float}


def _ctype(declared: str) -> type | None:
    """The ctypes type abi.py uses for a C type: a C string is c_char_p, any other pointer
    c_void_p."""
    if "".join(declared.split()) == "constchar*":
        return ctypes.c_char_p
    if "*" in declared:
        return ctypes.c_void_p
    name = declared.replace("const", "").strip()
    return abi.STRUCTS[name] if name in abi.STRUCTS else _SCALARS[name]


def header_structs() -> dict[str, list[tuple[str, type | None]]]:
    """Each struct's fields as (name, ctypes type), `const float *a, *b;` as two."""
    structs = {}
    for body, name in _STRUCT.findall(_CODE):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            first, *rest = decl.split(",")
            base, stars, field = re.fullmatch(r"([\w\s]+?)\s*(\**)\s*(\w+)", first.strip()).groups()
            fields.append((field, _ctype(base + stars)))
            for more in rest:
                stars, field = re.fullmatch(r"(\**)\s*(\w+)", more.strip()).groups()
                fields.append((field, _ctype(base + stars)))
        structs[name] = fields
    return structs


def header_functions() -> dict[str, tuple[type | None, list[type | None]]]:
    """Each declared function's (restype, argtypes) as abi.py should spell them."""
    functions = {}
    for restype, name, params in _FUNCTION.findall(_STRUCT.sub("", _CODE)):
        args = [] if params.strip() == "void" else params.split(",")
        functions[name] = (_ctype(restype), [_ctype(re.sub(r"\w+\s*$", "", a)) for a in args])
    return functions


def test_every_function_in_the_header_has_its_ctypes_signature_and_no_other() -> None:
    declared = header_functions()
    assert sorted(declared) == sorted(abi.SIGNATURES)
    for name, (restype, argtypes) in abi.SIGNATURES.items():
        assert declared[name] == (restype, argtypes), name


def test_every_struct_in_the_header_has_its_ctypes_mirror_field_by_field() -> None:
    declared = header_structs()
    assert sorted(declared) == sorted(abi.STRUCTS)
    for name, struct in abi.STRUCTS.items():
        ours = [(field.rstrip("_"), kind) for field, kind, *_ in struct._fields_]
        assert ours == declared[name], name


def test_the_abi_version_is_the_headers() -> None:
    version = re.search(r"#define\s+CPUK_ABI_VERSION\s+(\d+)", HEADER)
    assert version is not None and int(version.group(1)) == abi.ABI_VERSION


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_library_exports_exactly_the_headers_functions() -> None:
    lib = build.load_library()
    assert lib is not None
    symbols = subprocess.run(["nm", "-D", "--defined-only", lib._name], check=True,
                             capture_output=True, text=True).stdout.split("\n")
    exported = {line.split()[-1] for line in symbols if re.search(r" T \w+$", line)}
    assert {s for s in exported if not s.startswith("_")} == set(abi.SIGNATURES)


@pytest.fixture
def fresh_kernels() -> Iterator[None]:
    cpu.cpu_kernels.cache_clear()
    yield
    cpu.cpu_kernels.cache_clear()


def test_the_built_library_passes_the_check(fresh_kernels: None) -> None:
    lib = build.load_library()
    assert lib is not None and abi.check(lib) is None
    assert cpu.cpu_kernels() is not None


class _ShortStep(ctypes.Structure):
    _fields_ = abi.DecodeStep._fields_[:-1]  # work_bytes forgotten


@pytest.mark.parametrize(("patch", "message"), [
    (("ABI_VERSION", abi.ABI_VERSION + 1),
     f"ABI version {abi.ABI_VERSION}, Python expects {abi.ABI_VERSION + 1}"),
    (("STRUCTS", {**abi.STRUCTS, "cpuk_decode_step": _ShortStep}),
     "sizeof(cpuk_decode_step) is"),
    (("SIGNATURES", {**abi.SIGNATURES, "cpuk_gone": (None, [])}), "lacks cpuk_gone"),
])
def test_a_library_of_another_abi_is_refused_and_the_worker_keeps_pytorch_ops(
    fresh_kernels: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    tiny_model_dir, patch: tuple[str, object], message: str,
) -> None:
    monkeypatch.setattr(abi, *patch)
    with caplog.at_level(logging.WARNING, logger="worker.kernels.cpu"):
        assert cpu.cpu_kernels() is None
    assert "CPU kernels refused" in caplog.text and message in caplog.text
    backend = TorchBackend(tiny_model_dir("llama"), settings=TorchSettings(kv_cache_gb=0.02))
    assert backend.runner.ops.name == DecoderOps.name and backend.runner.plan is None

"""The Python side of csrc/kernels.h, the CPU kernels' whole ABI, in ctypes.

Every function the header declares has its signature in SIGNATURES and every struct it
passes its Structure in STRUCTS; tests/worker/kernels/test_abi.py parses the header and
fails when the two drift apart. A library is used only if `check` finds it built from the
same ABI: its CPUK_ABI_VERSION equal to ABI_VERSION and each struct's C sizeof equal to the
Structure's, so a stale or foreign library is refused with a reason rather than misread.
"""

from __future__ import annotations

import ctypes
from typing import Any

ABI_VERSION = 7
"""CPUK_ABI_VERSION of the header this module mirrors."""

_P, _I, _F, _C, _S = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
                      ctypes.c_char_p)


class Proj(ctypes.Structure):
    """cpuk_proj: one projection's weights (`in_` is C's `in`)."""

    _fields_ = [("weight", _P), ("scale", _P), ("bias", _P), ("out", _I), ("in_", _I),
                ("group", _I), ("bf16", _I)]


class Layer(ctypes.Structure):
    """cpuk_layer: one decoder layer's weights and cache."""

    _fields_ = [("input_norm", _P), ("post_norm", _P), ("next_norm", _P), ("q_norm", _P),
                ("k_norm", _P), ("qkv", Proj), ("o", Proj), ("gate_up", Proj),
                ("down", Proj), ("cache", _P)]


class DecodeStep(ctypes.Structure):
    """cpuk_decode_step: the model's shape, then one step's inputs, outputs and scratch."""

    _fields_ = [("layers", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I),
                ("head_dim", _I), ("inter", _I), ("slots", _I), ("block_size", _I),
                ("max_context", _I), ("cache_bf16", _I), ("eps", _F), ("cos", _P),
                ("sin", _P), ("n", _I), ("max_blocks", _I), ("positions", _P), ("slot_mapping", _P),
                ("block_tables", _P), ("context_lens", _P), ("residual", _P), ("out", _P),
                ("work", _P), ("work_bytes", _I)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "cpuk_proj": Proj, "cpuk_layer": Layer, "cpuk_decode_step": DecodeStep,
}
"""Each struct of the header, by its C name; cpuk_sizeof_<name without cpuk_> returns its
size."""

SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "cpuk_abi_version": (_I, []),
    "cpuk_sizeof_proj": (_I, []),
    "cpuk_sizeof_layer": (_I, []),
    "cpuk_sizeof_decode_step": (_I, []),
    "cpuk_set_prefetch": (None, [_I]),
    "cpuk_get_prefetch": (_I, []),
    "cpuk_set_row_stream": (None, [_I]),
    "cpuk_get_row_stream": (_I, []),
    "cpuk_set_row_stream_i8": (None, [_I]),
    "cpuk_get_row_stream_i8": (_I, []),
    "cpuk_set_attention_parts": (None, [_I]),
    "cpuk_get_attention_parts": (_I, []),
    "cpuk_set_attention_prefetch": (None, [_I]),
    "cpuk_get_attention_prefetch": (_I, []),
    "cpuk_linear_f32": (None, [_P, _I, _I, _P, _I, _P, _P]),
    "cpuk_set_amx": (None, [_I]),
    "cpuk_get_amx": (_I, []),
    "cpuk_set_amx_i8_rows": (None, [_I]),
    "cpuk_get_amx_i8_rows": (_I, []),
    "cpuk_linear_bf16": (_I, [_P, _I, _I, _P, _I, _P, _P, _P, _I]),
    "cpuk_linear_wbf16_workspace": (_I, [_I, _I]),
    "cpuk_linear_f32_wbf16": (_I, [_P, _I, _I, _P, _I, _P, _P, _P, _I]),
    "cpuk_linear_i8_workspace": (_I, [_I, _I, _I]),
    "cpuk_linear_i8": (_I, [_P, _I, _I, _P, _P, _I, _I, _P, _P, _P, _I]),
    "cpuk_rms_norm": (None, [_P, _P, _F, _I, _I, _P]),
    "cpuk_add_rms_norm": (None, [_P, _P, _P, _F, _I, _I, _P]),
    "cpuk_silu_mul": (None, [_P, _I, _I, _P]),
    "cpuk_causal_softmax": (None, [_P, _I, _I, _I, _F]),
    "cpuk_qk_rope_store": (None, [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _F, _P, _P, _P, _I,
                                  _I, _P]),
    "cpuk_prefill_attention_takes": (_I, [_I]),
    "cpuk_prefill_attention": (_I, [_P, _I, _I, _I, _I, _P, _P, _I, _F, _P, _P, _I]),
    "cpuk_decode_attention_workspace": (_I, [_I, _I, _I, _I, _I]),
    "cpuk_decode_attention": (_I, [_P, _I, _I, _I, _I, _P, _I, _I, _P, _I, _P, _I, _F, _P,
                                   _P, _I]),
    "cpuk_decode_workspace": (_I, [_P, _P, _I]),
    "cpuk_decode_forward": (_I, [_P, _P]),
    "cpuk_advise_hugepages": (_C, [_P, _I]),
    "cpuk_isa": (_S, []),
}
"""(restype, argtypes) of every exported function; pointers of any type are c_void_p, but
`const char *` (a C string) is c_char_p."""


def bind(lib: ctypes.CDLL) -> dict[str, Any]:
    """lib's functions with their signatures declared, once `check` has passed."""
    functions: dict[str, Any] = {}
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
        functions[name] = fn
    return functions


def check(lib: ctypes.CDLL) -> str | None:
    """Why lib's ABI is not this module's, or None when it is."""
    missing = [name for name in SIGNATURES if not hasattr(lib, name)]
    if missing:
        return f"the library lacks {', '.join(missing)}"
    functions = bind(lib)
    version = functions["cpuk_abi_version"]()
    if version != ABI_VERSION:
        return f"the library has ABI version {version}, Python expects {ABI_VERSION}"
    for name, struct in STRUCTS.items():
        size = functions["cpuk_sizeof_" + name.removeprefix("cpuk_")]()
        if size != ctypes.sizeof(struct):
            return (f"sizeof({name}) is {size} bytes in the library, "
                    f"{ctypes.sizeof(struct)} in Python")
    return None

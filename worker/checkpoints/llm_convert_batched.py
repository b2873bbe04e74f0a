"""tpu-mlir's llm_convert.py with batched decode nets that work: runs under the toolchain's
Python 3.10 (it imports nothing of npuserve), with llm_convert.py's own arguments.

tpu-mlir 1.30.2's `llm_convert.py -b B` (B > 1) fails for Qwen2/Qwen3/Llama: its decode nets
take positions [B, 1, 1], which its rotary-embedding gather does not shape (tpuc-opt aborts:
"error infer shape"); and with that mended, the nets write each token's key and value into
the cache with a tpu.Insert whose kernel fails to JIT ("ppl jit call failed") while the compile
still reports success, so the bmodel silently lacks it and decodes wrong tokens. Here, before
the converter runs:

- decode keeps the batch-1 design with a leading batch dimension: `block_cache_i` takes
  input_states [B, 1, H], position_ids [B, 1], attention_mask [B, 1, 1, SEQLEN + 1] and
  history [B, SEQLEN, KVH, D], and returns output_states [B, 1, H] with the new k_cache and
  v_cache [B, 1, KVH, D] (the caller writes them at each sequence's position), through the
  concatenation the batch-1 nets use; that concatenation copies (only_merge=False), since
  merging in place lays the rows out right only for B == 1;
- the rotary gather returns [B, L, 1, head_dim] for positions [B, L].

Prefill, embedding_cache and lm_head stay batch 1. On the BM1684X simulator these decode nets
give bit for bit the logits and keys of B batch-1 steps. The patch is checked against the
converter's source and refuses any other tpu-mlir version.
"""

import importlib
import importlib.metadata
import inspect
import os
import re
import runpy
import sys
import textwrap

PATCHED_FOR = "1.30.2"


def fail(message):
    sys.exit(f"llm_convert_batched: {message}")


def patch(converter_module, top, string_attr):
    cls = converter_module.LlmConverter
    source = textwrap.dedent(inspect.getsource(cls._gen_block_mlir_impl))
    source, n = re.subn(r"if self\.use_insert:(\n\s+id_shape\[0\] = self\.batch)",
                        r"if True:\1", source)
    concat = "T([1, kv_length + 1, self.num_key_value_heads, self.head_dim])"
    if n != 1 or source.count(concat) != 2 or "only_merge=True" not in source:
        fail("LlmConverter._gen_block_mlir_impl is not the code this patch was written for")
    source = source.replace(concat, concat.replace("T([1,", "T([self.batch,"))
    source = source.replace("only_merge=True", "only_merge=False")
    scope = {}
    exec(compile(source, f"{converter_module.__file__} (batched decode)", "exec"),
         converter_module.__dict__, scope)
    cls._gen_block_mlir_impl = scope["_gen_block_mlir_impl"]

    original_init = cls.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.use_insert = False
        self.position_shape = [1, self.max_input_length]

    def apply_rotary_pos(self, mlir_gen, pos_op, q_op, k_op, rotary_cos, rotary_sin):
        batch, length = pos_op.type.shape[0], pos_op.type.shape[-1]
        ip = mlir_gen.insert_point
        tables = []
        for name in (rotary_cos, rotary_sin):
            weight = mlir_gen.create_weight_op(name + ".weight",
                                               [self.seq_length, 1, self.head_dim])
            tables.append(top.GatherOp(
                mlir_gen.get_tensor_type([batch, length, 1, self.head_dim]), weight, pos_op,
                axis=0, loc=self.get_loc(name, mlir_gen), ip=ip).output)
        cos_op, sin_op = tables
        rotated = []
        for op, loc in ((q_op, "q_proj"), (k_op, "k_cache")):
            rotated.append(top.RopeOp(
                mlir_gen.get_tensor_type(op.type.shape), op, sin_op, cos_op,
                rope_mode=string_attr.get("contiguous_halves"), loc=self.get_loc(loc, mlir_gen),
                ip=ip).output)
        return rotated[0], rotated[1]

    if "dim = pos_op.type.shape[-1]" not in inspect.getsource(cls.apply_rotary_pos):
        fail("LlmConverter.apply_rotary_pos is not the code this patch was written for")
    cls.__init__ = __init__
    cls.apply_rotary_pos = apply_rotary_pos


def main():
    version = importlib.metadata.version("tpu_mlir")
    if version != PATCHED_FOR:
        fail(f"batched decode is patched for tpu-mlir {PATCHED_FOR}, not {version}")
    import tpu_mlir  # sets TPUC_ROOT and the tools' paths for the converter's subprocesses

    root = os.environ.get("TPUC_ROOT") or os.path.dirname(tpu_mlir.__file__)
    for path in (root, f"{root}/python", f"{root}/python/tools", f"{root}/regression"):
        if path not in sys.path:
            sys.path.insert(0, path)
    converter_module = importlib.import_module("llm.LlmConverter")
    from mlir.dialects import top
    from mlir.ir import StringAttr

    patch(converter_module, top, StringAttr)
    sys.argv[0] = f"{root}/python/tools/llm_convert.py"
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

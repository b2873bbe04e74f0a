"""Running a bmodel on a BM1684X card through Sophgo's `sophon.sail` (built from the SOPHON
SDK; not on PyPI). Imported only when a worker is given a card index.

Written against sophon-sail's documented Python API (`sail.Handle(dev_id)`,
`sail.EngineLLM(bmodel_path, [dev_id])` with `get_input_names/shape/dtype(graph, i)`,
`process(graph, {i: Tensor}, {i: Tensor})`; `sail.Tensor(handle, shape, dtype, own_sys,
own_dev)` with `update_data`, `zeros`, `sync_d2d(src, src_offset, dst_offset, count)`,
`sync_d2s`, `asnumpy`; `sail.get_dev_stat(dev_id)`), the same calls Sophgo's own Qwen demos
make. It has never run on a card: the tests drive it with a stand-in `sail` module that has
these signatures and runs the nets from a recorded simulator run.

Everything the protocol moves between nets stays in device memory: the hidden states, the
KV slots (`buffer`), the row copies (`copy`, device to device). Only ids, positions, masks
and lm_head's output cross PCIe.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from common.errors import DeviceError, ModelConfigError
from worker.backends.base import DeviceStats

log = logging.getLogger(__name__)

_FAMILY = re.compile(r"_\d+$")


def import_sail() -> ModuleType:
    """sophon.sail, or an error that says how to get it."""
    try:
        return importlib.import_module("sophon.sail")
    except ImportError as exc:
        raise ModelConfigError(
            "a BM1684X card needs sophon.sail, which is built from Sophgo's SOPHON SDK (not "
            "PyPI's empty 'sophon' package): install the SDK's sophon-sail wheel for this "
            f"Python into the worker's venv, or use --sophon-device sim ({exc})") from None


@dataclass(slots=True)
class _Net:
    """A kind of net (block_0..block_N-1 share one) and the device tensors it is fed from and
    writes to; every net of the kind has the same signature."""

    inputs: list[str]
    input_tensors: dict[int, Any]
    outputs: list[str]
    output_tensors: dict[int, Any]


class SailRuntime:
    """One bmodel on one card; the protocol's `Runtime` with device-resident values."""

    def __init__(self, bmodel: str, dev_id: int, sail: ModuleType | None = None) -> None:
        self.sail = sail or import_sail()
        self.dev_id = dev_id
        self.handle = self.sail.Handle(dev_id)
        self.engine = self.sail.EngineLLM(bmodel, [dev_id])
        self._nets: dict[str, _Net] = {}
        self._buffers: set[int] = set()
        self._lock = threading.Lock()

    def run(self, net: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            kind = self._net(net)
            feed: dict[int, Any] = {}
            for i, name in enumerate(kind.inputs):
                value = inputs[name]
                if isinstance(value, np.ndarray):
                    kind.input_tensors[i].update_data(np.ascontiguousarray(value))
                    feed[i] = kind.input_tensors[i]
                elif id(value) in self._buffers:
                    feed[i] = value  # a session's own buffer: the net reads it in place
                else:  # another net's output: copy it into this net's input on the device
                    target = kind.input_tensors[i]
                    target.sync_d2d(value, 0, 0, min(_elements(value), _elements(target)))
                    feed[i] = target
            try:
                self.engine.process(net, feed, kind.output_tensors)
            except RuntimeError as exc:  # sail reports a failed bmrt launch this way
                raise DeviceError(f"net {net} failed on BM1684X card {self.dev_id}: {exc}"
                                  ) from exc
            return {name: kind.output_tensors[i] for i, name in enumerate(kind.outputs)}

    def buffer(self, shape: Sequence[int]) -> Any:
        tensor = self.sail.Tensor(self.handle, list(shape), self.sail.Dtype.BM_BFLOAT16,
                                  False, True)
        tensor.zeros()
        self._buffers.add(id(tensor))
        return tensor

    def copy(self, dst: Any, src: Any, dst_offset: int, src_offset: int, count: int) -> None:
        dst.sync_d2d(src, src_offset, dst_offset, count)

    def to_host(self, value: Any) -> np.ndarray:
        value.sync_d2s()
        return np.array(value.asnumpy())

    def device_stats(self) -> DeviceStats:
        """`get_dev_stat`: [memory total MiB, memory used MiB, TPU utilisation %]."""
        total_mb, used_mb, util = self.sail.get_dev_stat(self.dev_id)[:3]
        return DeviceStats(int(total_mb) << 20, int(used_mb) << 20, float(util) / 100.0)

    def close(self) -> None:
        self._nets.clear()
        self._buffers.clear()

    def _net(self, net: str) -> _Net:
        family = _FAMILY.sub("", net)
        kind = self._nets.get(family)
        if kind is None:
            e, sail, handle = self.engine, self.sail, self.handle
            n_in, n_out = len(e.get_input_names(net)), len(e.get_output_names(net))
            kind = _Net(
                list(e.get_input_names(net)),
                {i: sail.Tensor(handle, list(e.get_input_shape(net, i)),
                                e.get_input_dtype(net, i), False, True) for i in range(n_in)},
                list(e.get_output_names(net)),
                {i: sail.Tensor(handle, list(e.get_output_shape(net, i)),
                                e.get_output_dtype(net, i), True, True) for i in range(n_out)})
            self._nets[family] = kind
        return kind


def _elements(tensor: Any) -> int:
    return int(np.prod(tensor.shape()))

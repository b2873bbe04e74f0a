"""A stand-in for `sophon.sail` with the real signatures (the ones card.SailRuntime calls),
keeping host and device memory apart so a test sees every byte that crosses PCIe. Nets run
through any callable `run(net, inputs) -> outputs` on numpy arrays (a recorded simulator
run, in the tests)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np


class Dtype(enum.Enum):
    BM_FLOAT32 = 0
    BM_FLOAT16 = 1
    BM_INT32 = 6
    BM_BFLOAT16 = 8


_NUMPY = {Dtype.BM_FLOAT32: np.float32, Dtype.BM_FLOAT16: np.uint16, Dtype.BM_INT32: np.int32,
          Dtype.BM_BFLOAT16: np.uint16}
_BY_NAME = {"float32": Dtype.BM_FLOAT32, "float16": Dtype.BM_FLOAT16, "int32": Dtype.BM_INT32,
            "bfloat16": Dtype.BM_BFLOAT16}


class Traffic:
    def __init__(self) -> None:
        self.to_device = 0
        self.to_host = 0


class Handle:
    def __init__(self, dev_id: int) -> None:
        self.dev_id = dev_id
        self.traffic = Traffic()


class Tensor:
    def __init__(self, handle: Handle, shape: Sequence[int], dtype: Dtype, own_sys_data: bool,
                 own_dev_data: bool) -> None:
        assert own_dev_data, "SailRuntime only makes tensors with device memory"
        self.handle = handle
        self._shape = list(shape)
        self._dtype = dtype
        self.device = np.full(self._shape, 0x7FC0, _NUMPY[dtype]).reshape(-1)  # garbage
        self.system = np.zeros_like(self.device) if own_sys_data else None

    def shape(self) -> list[int]:
        return list(self._shape)

    def dtype(self) -> Dtype:
        return self._dtype

    def own_sys_data(self) -> bool:
        return self.system is not None

    def update_data(self, data: np.ndarray) -> None:
        flat = np.ascontiguousarray(data).reshape(-1)
        assert flat.dtype == self.device.dtype, (flat.dtype, self.device.dtype)
        assert flat.size <= self.device.size
        target = self.system if self.system is not None else self.device
        target[: flat.size] = flat
        if self.system is None:
            self.handle.traffic.to_device += flat.nbytes

    def zeros(self) -> None:
        self.device.fill(0)

    def sync_d2d(self, src: Tensor, offset_src: int, offset_dst: int, len: int) -> None:  # noqa: A002
        assert offset_src + len <= src.device.size and offset_dst + len <= self.device.size
        self.device[offset_dst:offset_dst + len] = src.device[offset_src:offset_src + len]

    def sync_d2s(self) -> None:
        assert self.system is not None
        self.system[:] = self.device
        self.handle.traffic.to_host += self.device.nbytes

    def asnumpy(self) -> np.ndarray:
        assert self.system is not None, "a device-only tensor has no system memory"
        return self.system.reshape(self._shape).copy()


class EngineLLM:
    def __init__(self, nets: Mapping[str, Any], run: Callable[..., dict[str, np.ndarray]]
                 ) -> None:
        self.nets = nets
        self._run = run
        self.fail_next: set[str] = set()

    def _io(self, graph: str, io: str) -> list[dict[str, Any]]:
        family = graph.rsplit("_", 1)[0] if graph[-1].isdigit() else graph
        spec = self.nets.get(graph) or self.nets[family + "_0"]
        return list(spec[io])

    def get_input_names(self, graph: str) -> list[str]:
        return [t["name"] for t in self._io(graph, "inputs")]

    def get_output_names(self, graph: str) -> list[str]:
        return [t["name"] for t in self._io(graph, "outputs")]

    def get_input_shape(self, graph: str, index: int) -> list[int]:
        return list(self._io(graph, "inputs")[index]["shape"])

    def get_output_shape(self, graph: str, index: int) -> list[int]:
        return list(self._io(graph, "outputs")[index]["shape"])

    def get_input_dtype(self, graph: str, index: int) -> Dtype:
        return _BY_NAME[self._io(graph, "inputs")[index]["dtype"]]

    def get_output_dtype(self, graph: str, index: int) -> Dtype:
        return _BY_NAME[self._io(graph, "outputs")[index]["dtype"]]

    def process(self, graph: str, inputs: Mapping[int, Tensor], outputs: Mapping[int, Tensor]
                ) -> None:
        if graph in self.fail_next:
            self.fail_next.discard(graph)
            raise RuntimeError(f"bmrt_launch_tensor_ex failed for {graph}")
        specs = self._io(graph, "inputs")
        feed = {spec["name"]: inputs[i].device.reshape(spec["shape"])
                for i, spec in enumerate(specs)}
        results = self._run(graph, feed)
        for i, spec in enumerate(self._io(graph, "outputs")):
            value = np.asarray(results[spec["name"]]).reshape(-1)
            outputs[i].device[: value.size] = value.view(outputs[i].device.dtype)


def module(nets: Mapping[str, Any], run: Callable[..., dict[str, np.ndarray]],
           stat: Sequence[float] = (16384, 5120, 37)) -> SimpleNamespace:
    """A `sophon.sail` whose EngineLLM runs `nets` (a manifest's net table) through `run`."""
    engine = EngineLLM(nets, run)
    return SimpleNamespace(
        Dtype=Dtype, Handle=Handle, Tensor=Tensor,
        EngineLLM=lambda bmodel, dev_ids: engine,
        get_dev_stat=lambda dev_id: list(stat), engine=engine)

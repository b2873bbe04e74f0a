"""The simulator side of `simulator.SimulatorRuntime`: runs under tpu-mlir's Python 3.10.

It imports only numpy and tpu-mlir's pyruntime_bm (nothing of npuserve, whose code needs a
newer Python), loads one bmodel on the BM1684X C-model, and serves net calls over the two
pipe fds given after the bmodel (requests in, replies out): the simulator prints to stdout,
which therefore cannot carry the replies.

A message is an 8-byte little-endian length, then an .npz archive. A request holds the net's
name in `__net__` and one array per input; the reply holds one array per output, or
`__error__` with the text of the exception. bfloat16 travels as uint16 bits.
"""

import ctypes
import io
import os
import struct
import sys
import traceback

import numpy as np


def _load_runtime():
    import tpu_mlir

    root = os.path.dirname(tpu_mlir.__file__)
    sys.path.insert(0, os.path.join(root, "python"))
    # The runtime resolves libcmodel.so by name when a model loads; bind the BM1684X one.
    ctypes.CDLL(os.path.join(root, "lib", "libcmodel_bm1684x.so"), mode=ctypes.RTLD_GLOBAL)
    import pyruntime_bm

    return pyruntime_bm


def _read(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    with np.load(io.BytesIO(stream.read(size))) as archive:
        return {name: archive[name] for name in archive.files}


def _write(stream, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def main():
    bmodel, requests_fd, replies_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")
    runtime = _load_runtime()
    model = runtime.Model(bmodel, 0, "")
    nets = {name: model.Net(name) for name in model.networks}
    _write(replies, {"__nets__": np.array(sorted(nets))})
    while True:
        request = _read(requests)
        if request is None:
            return
        try:
            net = nets[str(request.pop("__net__"))]
            for tensor in net.inputs:
                value = request[tensor.name]
                tensor.data.reshape(-1)[: value.size] = value.reshape(-1).view(tensor.data.dtype)
            net.forward()
            _write(replies, {t.name: np.array(t.data) for t in net.outputs})
        except Exception:
            _write(replies, {"__error__": np.array(traceback.format_exc())})


if __name__ == "__main__":
    main()

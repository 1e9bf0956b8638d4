"""Device memory, streams and CUDA graphs through cuda-python, for the torch-free GPU path.

The TensorRT backend takes its stream and CUDA graphs from here (its memory is skyrt._core.Buffer,
allocated and counted by the core); the TensorRT captioner and benchmarks/gpu_validate.py also use
DeviceArray for device buffers by address. Every call checks its CUDA error
and raises `CudaError` naming the call, so a missing driver or GPU is one clear message.

Not executable on a machine without a GPU (tests check the error path only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class CudaError(RuntimeError):
    """A CUDA runtime call failed (or cuda-python is missing)."""


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as err:
        raise CudaError("the GPU path needs cuda-python: pip install \"skyrt[tensorrt]\" (or cuda-python>=12)") from err
    return cudart


def check(result, what: str):
    """Unpack a cuda-python result tuple (err, *values), raising on an error."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name}" + (
            " (no usable NVIDIA driver/GPU on this machine)" if "Driver" in name or "NoDevice" in name else ""))
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def device_count() -> int:
    """GPUs visible to CUDA (0 when there is no driver)."""
    try:
        return int(check(_cudart().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except CudaError:
        return 0


def compute_capability(device: int = 0) -> str:
    cudart = _cudart()
    attr = cudart.cudaDeviceAttr
    major = check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return f"{major}.{minor}"


class Stream:
    """A CUDA stream; `handle` is what TensorRT and skyrt._core.cuda take (an int address)."""

    def __init__(self):
        self._stream = check(_cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    @property
    def raw(self):
        return self._stream

    def synchronize(self) -> None:
        check(_cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            check(_cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


@dataclass
class DeviceArray:
    """A device buffer with a numpy-style shape and dtype; `ptr` is its address."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ptr: int

    @classmethod
    def empty(cls, shape, dtype) -> "DeviceArray":
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        ptr = check(_cudart().cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)")
        return cls(tuple(int(d) for d in shape), dtype, int(ptr))

    @classmethod
    def zeros(cls, shape, dtype, stream: Stream | None = None) -> "DeviceArray":
        out = cls.empty(shape, dtype)
        cudart = _cudart()
        if stream is None:
            check(cudart.cudaMemset(out.ptr, 0, out.nbytes), "cudaMemset")
        else:
            check(cudart.cudaMemsetAsync(out.ptr, 0, out.nbytes, stream.raw), "cudaMemsetAsync")
        return out

    @classmethod
    def from_host(cls, array: np.ndarray, stream: Stream | None = None) -> "DeviceArray":
        array = np.ascontiguousarray(array)
        out = cls.empty(array.shape, array.dtype)
        out.upload(array, stream)
        return out

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def upload(self, array: np.ndarray, stream: Stream | None = None) -> None:
        """Host -> device. With a stream the copy is async: keep `array` alive until it syncs."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.nbytes != self.nbytes:
            raise ValueError(f"upload of {array.shape} {array.dtype} into a device array {self.shape} {self.dtype}")
        self._copy(self.ptr, array.ctypes.data, "HostToDevice", stream)

    def download(self, stream: Stream | None = None) -> np.ndarray:
        """Device -> host (synchronous: waits for the stream)."""
        out = np.empty(self.shape, self.dtype)
        self._copy(out.ctypes.data, self.ptr, "DeviceToHost", stream)
        if stream is not None:
            stream.synchronize()
        return out

    def copy_from(self, other: "DeviceArray", stream: Stream | None = None) -> None:
        if other.nbytes != self.nbytes:
            raise ValueError(f"device copy of {other.nbytes} bytes into {self.nbytes}")
        self._copy(self.ptr, other.ptr, "DeviceToDevice", stream)

    def _copy(self, dst: int, src: int, kind: str, stream: Stream | None) -> None:
        cudart = _cudart()
        direction = getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
        if stream is None:
            check(cudart.cudaMemcpy(dst, src, self.nbytes, direction), f"cudaMemcpy {kind}")
        else:
            check(cudart.cudaMemcpyAsync(dst, src, self.nbytes, direction, stream.raw), f"cudaMemcpyAsync {kind}")

    def free(self) -> None:
        if self.ptr:
            check(_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class CudaGraph:
    """Capture a sequence of launches on `stream` once, then replay it with one call.

    Static-shape engine steps qualify: same buffers, same shapes, every time.
    """

    def __init__(self, stream: Stream):
        self.stream = stream
        self._graph = None
        self._exec = None

    def capture(self, launch) -> None:
        cudart = _cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(self.stream.raw, mode), "cudaStreamBeginCapture")
        try:
            launch()
        finally:
            self._graph = check(cudart.cudaStreamEndCapture(self.stream.raw), "cudaStreamEndCapture")
        self._exec = check(cudart.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    @property
    def captured(self) -> bool:
        return self._exec is not None

    def replay(self) -> None:
        check(_cudart().cudaGraphLaunch(self._exec, self.stream.raw), "cudaGraphLaunch")

    def close(self) -> None:
        """Destroy the executable graph and the graph now (idempotent); the stream stays."""
        cudart = _cudart()
        if self._exec is not None:
            check(cudart.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            check(cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None

// buffer.cpp — allocation, counters and copies for host and CUDA memory (see buffer.h).
#include "buffer.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#ifdef SKYRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace skyrt {

namespace {

std::atomic<int64_t> g_allocations{0}, g_frees{0}, g_live{0}, g_live_bytes{0};

void count_alloc(size_t bytes) {
  ++g_allocations;
  ++g_live;
  g_live_bytes += static_cast<int64_t>(bytes);
}

void count_free(size_t bytes) {
  ++g_frees;
  --g_live;
  g_live_bytes -= static_cast<int64_t>(bytes);
}

constexpr size_t kAlign = 64;  // cache line; also what vectorised loads like

}  // namespace

bool parse_dtype(const std::string& name, DType* out) {
  if (name == "float32") *out = kFloat32;
  else if (name == "float16") *out = kFloat16;
  else if (name == "uint8" || name == "bool") *out = kUInt8;
  else if (name == "int64") *out = kInt64;
  else return false;
  return true;
}

bool parse_device(const std::string& name, Device* out) {
  if (name == "cpu") {
    *out = Device{};
    return true;
  }
  if (name.rfind("cuda", 0) != 0) return false;
  Device d;
  d.cuda = true;
  if (name.size() > 4) {
    if (name[4] != ':' || name.size() == 5) return false;
    try {
      d.index = std::stoi(name.substr(5));
    } catch (...) {
      return false;
    }
  }
  *out = d;
  return true;
}

std::string Buffer::describe() const {
  std::string s = std::string(dtype_name(dtype)) + " [";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "] on " + device.str() + " (" + std::to_string(nbytes()) + " bytes)";
}

Buffer Buffer::slice(int64_t offset_elems, std::vector<int64_t> new_shape) const {
  Buffer b = *this;
  b.ptr = static_cast<char*>(ptr) + static_cast<size_t>(offset_elems) * dtype_size(dtype);
  b.shape = std::move(new_shape);
  return b;
}

MemoryStats memory_stats() {
  MemoryStats s;
  s.allocations = g_allocations.load();
  s.frees = g_frees.load();
  s.live = g_live.load();
  s.live_bytes = g_live_bytes.load();
  return s;
}

Buffer allocate(Device device, DType dtype, std::vector<int64_t> shape, bool zero, void* stream) {
  Buffer b;
  b.dtype = dtype;
  b.device = device;
  b.shape = std::move(shape);
  for (int64_t d : b.shape)
    if (d < 0) throw std::invalid_argument("allocate: negative dimension in " + b.describe());
  const size_t bytes = std::max<size_t>(b.nbytes(), 1);
  if (!device.cuda) {
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    if (p == nullptr) throw std::runtime_error("allocate: out of host memory for " + b.describe());
    if (zero) std::memset(p, 0, rounded);
    count_alloc(bytes);
    b.ptr = p;
    b.owner = std::shared_ptr<void>(p, [bytes](void* q) {
      std::free(q);
      count_free(bytes);
    });
    return b;
  }
#ifdef SKYRT_WITH_CUDA
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device.index);
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaSuccess && zero) cudaMemsetAsync(p, 0, bytes, static_cast<cudaStream_t>(stream));
  cudaSetDevice(previous);
  if (err != cudaSuccess)
    throw std::runtime_error("allocate: cudaMalloc of " + b.describe() + " failed: " + cudaGetErrorString(err));
  count_alloc(bytes);
  b.ptr = p;
  b.owner = std::shared_ptr<void>(p, [bytes](void* q) {
    cudaFree(q);
    count_free(bytes);
  });
  return b;
#else
  (void)stream;
  throw std::runtime_error("allocate: " + b.describe() + " needs CUDA, and " + status_message(kNotCompiled));
#endif
}

int copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes, void* stream) {
  if (bytes == 0) return kOk;
  if (dst == nullptr || src == nullptr) return kInvalidArgument;
  if (!dst_device.cuda && !src_device.cuda) {
    std::memmove(dst, src, bytes);
    return kOk;
  }
#ifdef SKYRT_WITH_CUDA
  const cudaMemcpyKind kind = !src_device.cuda ? cudaMemcpyHostToDevice
                              : !dst_device.cuda ? cudaMemcpyDeviceToHost
                                                 : cudaMemcpyDeviceToDevice;
  const auto s = static_cast<cudaStream_t>(stream);
  if (cudaMemcpyAsync(dst, src, bytes, kind, s) != cudaSuccess) return kCudaError;
  // Host memory the caller owns (numpy) must be complete, or safe to reuse, on return.
  if (kind != cudaMemcpyDeviceToDevice && cudaStreamSynchronize(s) != cudaSuccess) return kCudaError;
  return kOk;
#else
  (void)stream;
  return kNotCompiled;
#endif
}

int copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
              Device device, void* stream) {
  if (width == 0 || rows == 0) return kOk;
  if (dst == nullptr || src == nullptr || dst_pitch < width || src_pitch < width) return kInvalidArgument;
  if (!device.cuda) {
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
    return kOk;
  }
#ifdef SKYRT_WITH_CUDA
  return cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice,
                           static_cast<cudaStream_t>(stream)) == cudaSuccess
             ? kOk
             : kCudaError;
#else
  (void)stream;
  return kNotCompiled;
#endif
}

int fill_zero(void* dst, size_t bytes, Device device, void* stream) {
  if (bytes == 0) return kOk;
  if (dst == nullptr) return kInvalidArgument;
  if (!device.cuda) {
    std::memset(dst, 0, bytes);
    return kOk;
  }
#ifdef SKYRT_WITH_CUDA
  return cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(stream)) == cudaSuccess ? kOk : kCudaError;
#else
  (void)stream;
  return kNotCompiled;
#endif
}

int synchronize(Device device, void* stream) {
  if (!device.cuda) return kOk;
#ifdef SKYRT_WITH_CUDA
  return cudaStreamSynchronize(static_cast<cudaStream_t>(stream)) == cudaSuccess ? kOk : kCudaError;
#else
  (void)stream;
  return kNotCompiled;
#endif
}

}  // namespace skyrt

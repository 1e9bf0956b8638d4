// buffer.h — typed memory on ONE device (host or a CUDA GPU), allocated once and counted.
//
// A Buffer carries what a kernel call must check before it touches memory: the address, the
// dtype, the shape (so the size) and the device. The rollout core allocates every buffer of a
// stream through `allocate` when the stream is configured and never during a step; the counters
// in memory_stats() let tests assert exactly that ("zero allocations after warm-up").
//
// Host memory is reference counted (a numpy view keeps it alive after the core is closed); device
// memory is freed when its last owner goes, which the core makes deterministic: close() drops
// every owner it holds and Python only ever sees non-owning device views.
//
// Copies go through copy_bytes / copy_rows / fill_zero, which pick memcpy on the host and the
// CUDA runtime (async on the given stream) on a GPU: the same call sites serve both.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace skyrt {

// kInt64 carries the integer inputs of exported graphs (the fps class); no kernel takes it.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kUInt8 = 2, kInt64 = 3 };

inline size_t dtype_size(DType d) { return d == kFloat32 ? 4 : d == kFloat16 ? 2 : d == kInt64 ? 8 : 1; }
inline const char* dtype_name(DType d) {
  return d == kFloat32 ? "float32" : d == kFloat16 ? "float16" : d == kInt64 ? "int64" : "uint8";
}
bool parse_dtype(const std::string& name, DType* out);  // "float32", "float16", "uint8" (also "bool"), "int64"

struct Device {
  bool cuda = false;
  int index = 0;
  std::string str() const { return cuda ? "cuda:" + std::to_string(index) : "cpu"; }
  bool operator==(const Device& o) const { return cuda == o.cuda && (!cuda || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
};
bool parse_device(const std::string& name, Device* out);  // "cpu", "cuda", "cuda:N"

struct Buffer {
  void* ptr = nullptr;
  DType dtype = kFloat32;
  Device device;
  std::vector<int64_t> shape;
  std::shared_ptr<void> owner;  // null: a view of memory owned elsewhere

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  std::string describe() const;  // "float32 [2, 16, 3] on cuda:0 (384 bytes)"
  Buffer view() const {          // the same memory without ownership (what Python gets for a GPU)
    Buffer b = *this;
    b.owner.reset();
    return b;
  }
  // Element `offset` on, with a new shape (must fit: checked by the caller with fits()).
  Buffer slice(int64_t offset_elems, std::vector<int64_t> new_shape) const;
};

struct MemoryStats {
  int64_t allocations = 0;  // allocate() calls that reserved memory, ever
  int64_t frees = 0;
  int64_t live = 0;  // allocations not yet freed
  int64_t live_bytes = 0;
};
MemoryStats memory_stats();

// Allocates numel(shape) elements on `device` (zero-filled when `zero`). Throws std::runtime_error
// naming the device and size when the memory is not there (or when CUDA is not compiled in).
Buffer allocate(Device device, DType dtype, std::vector<int64_t> shape, bool zero, void* stream);

// Plain bytes between any two devices of the same kind or host<->device; async on `stream` on a
// GPU (a host destination is synchronised before return).
int copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes, void* stream);
// `rows` rows of `width` bytes, strided by the pitches, on one device (cudaMemcpy2DAsync on a GPU).
int copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
              Device device, void* stream);
int fill_zero(void* dst, size_t bytes, Device device, void* stream);
int synchronize(Device device, void* stream);

}  // namespace skyrt

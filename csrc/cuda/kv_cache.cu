// kv_cache.cu — CUDA kernels for the ring KV cache: kv_write_block and kv_rope_rebase.
// CPU references with the same names and arguments in ../kv_cache.cpp; the per-pair RoPE math
// (rope_shift_table, rope_rotate_pair) is shared through kv_cache.h. The rotation table is built
// once on the host per launch (angles in double) and passed by value, so the kernel does only
// float loads, 4 multiply-adds and stores.
// Compiled in CI with nvcc; executed only on a user's GPU.
#include <cuda_runtime.h>
#include "cuda/launch.cuh"
#include "kv_cache.h"

namespace skyrt {
namespace cuda {

namespace {

// cache[l, slot, e] = src[l, e]; one thread per element, grid-stride.
template <typename T>
__global__ void kv_write_block_kernel(const T* src, int64_t src_layer_stride, T* cache, int64_t cache_layer_stride,
                                      int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems) {
  const int64_t n = layers * block_elems;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = i / block_elems, e = i - l * block_elems;
    cache[l * cache_layer_stride + slot * cache_slot_stride + e] = src[l * src_layer_stride + e];
  }
}

// One thread per (layer, slot, token, head, temporal pair).
template <typename T>
__global__ void kv_rope_rebase_kernel(T* keys, int64_t slots, int64_t tokens, int64_t heads, int64_t layer_stride,
                                      int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t n,
                                      RopeShiftTable table) {
  const int64_t pairs = table.pairs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = i / pairs;
    const int j = static_cast<int>(i - r * pairs);
    const int64_t h = r % heads;
    r /= heads;
    const int64_t t = r % tokens;
    r /= tokens;
    const int64_t s = r % slots;
    const int64_t l = r / slots;
    T* x = keys + l * layer_stride + s * slot_stride + t * token_stride + h * head_stride + 2 * j;
    float re = load_float(x[0]), im = load_float(x[1]);
    rope_rotate_pair(&re, &im, table.cos[j], table.sin[j]);
    store_float(&x[0], re);
    store_float(&x[1], im);
  }
}

template <typename T>
int write_block(const T* src, int64_t src_layer_stride, T* cache, int64_t cache_layer_stride,
                int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems, void* stream) {
  if (int status = kv_write_block_check(src, cache, slot, layers, block_elems); status != kOk) return status;
  const int64_t n = layers * block_elems;
  if (n == 0) return kOk;
  kv_write_block_kernel<T><<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      src, src_layer_stride, cache, cache_layer_stride, cache_slot_stride, slot, layers, block_elems);
  return launch_status();
}

template <typename T>
int rope_rebase(T* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
                double theta, void* stream) {
  if (int status = kv_rope_rebase_check(keys, layers, slots, tokens, heads, head_dim); status != kOk) return status;
  RopeShiftTable table;
  rope_shift_table(head_dim, shift, theta, &table);
  const int64_t n = layers * slots * tokens * heads * table.pairs;
  if (n == 0) return kOk;
  kv_rope_rebase_kernel<T><<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      keys, slots, tokens, heads, layer_stride, slot_stride, token_stride, head_stride, n, table);
  return launch_status();
}

}  // namespace

int kv_write_block(const float* src, int64_t src_layer_stride, float* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems, void* stream) {
  return write_block(src, src_layer_stride, cache, cache_layer_stride, cache_slot_stride, slot, layers, block_elems,
                     stream);
}

int kv_write_block(const f16* src, int64_t src_layer_stride, f16* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems, void* stream) {
  return write_block(src, src_layer_stride, cache, cache_layer_stride, cache_slot_stride, slot, layers, block_elems,
                     stream);
}

int kv_rope_rebase(float* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
                   double theta, void* stream) {
  return rope_rebase(keys, layers, slots, tokens, heads, head_dim, layer_stride, slot_stride, token_stride,
                     head_stride, shift, theta, stream);
}

int kv_rope_rebase(f16* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
                   double theta, void* stream) {
  return rope_rebase(keys, layers, slots, tokens, heads, head_dim, layer_stride, slot_stride, token_stride,
                     head_stride, shift, theta, stream);
}

}  // namespace cuda
}  // namespace skyrt

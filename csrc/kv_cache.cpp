// kv_cache.cpp — ring slot bookkeeping and the CPU references of kv_write_block / kv_rope_rebase
// (see kv_cache.h; the CUDA kernels are in cuda/kv_cache.cu).
#include "kv_cache.h"

#include <algorithm>
#include <cstring>

namespace skyrt {

// ---- KVRing ----------------------------------------------------------------------------------------

int KVRing::check(int64_t sink_blocks, int64_t window_blocks, int64_t frames_per_block, std::string* why) {
  std::string message;
  if (sink_blocks < 0) message = "sink_blocks must be >= 0";
  else if (window_blocks < 1) message = "window_blocks must be >= 1 (the ring needs a slot to evict into)";
  else if (frames_per_block < 1) message = "frames_per_block must be >= 1";
  if (message.empty()) return kOk;
  if (why != nullptr) *why = message;
  return kInvalidArgument;
}

KVRing::KVRing(int64_t sink_blocks, int64_t window_blocks, int64_t frames_per_block)
    : sink_(sink_blocks), window_(window_blocks), frames_per_block_(frames_per_block) {
  reset();
}

void KVRing::reset() {
  appended_ = 0;
  origin_ = 0;
  last_block_ = -1;
  slot_block_.assign(static_cast<size_t>(capacity()), -1);
  slot_position_.assign(static_cast<size_t>(capacity()), 0);
}

int64_t KVRing::size() const {
  return static_cast<int64_t>(std::count_if(slot_block_.begin(), slot_block_.end(), [](int64_t b) { return b >= 0; }));
}

int KVRing::append(int64_t block, KVAppend* out) {
  if (block <= last_block_ || block < 0) return kInvalidArgument;
  // Appends 0..sink-1 fill the sinks; append n >= sink goes to window slot (n - sink) % window.
  const int64_t slot = appended_ < sink_ ? appended_ : sink_ + (appended_ - sink_) % window_;
  out->slot = slot;
  out->evicted_block = slot_block_[static_cast<size_t>(slot)];
  out->position = position_of(block);
  slot_block_[static_cast<size_t>(slot)] = block;
  slot_position_[static_cast<size_t>(slot)] = out->position;
  last_block_ = block;
  ++appended_;
  return kOk;
}

void KVRing::rebase(int64_t shift) {
  origin_ += shift;
  for (size_t s = 0; s < slot_block_.size(); ++s)
    if (slot_block_[s] >= 0) slot_position_[s] -= shift;
}

std::vector<int64_t> KVRing::slots_in_order() const {
  std::vector<int64_t> order;
  for (int64_t s = 0; s < std::min(appended_, sink_); ++s) order.push_back(s);
  const int64_t in_window = std::min(std::max(appended_ - sink_, int64_t{0}), window_);
  const int64_t next = appended_ > sink_ ? (appended_ - sink_) % window_ : 0;  // oldest when full
  const int64_t oldest = in_window < window_ ? 0 : next;
  for (int64_t k = 0; k < in_window; ++k) order.push_back(sink_ + (oldest + k) % window_);
  return order;
}

// ---- CPU references --------------------------------------------------------------------------------

namespace {

template <typename T>
int write_block(const T* src, int64_t src_layer_stride, T* cache, int64_t cache_layer_stride,
                int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems) {
  if (int status = kv_write_block_check(src, cache, slot, layers, block_elems); status != kOk) return status;
  for (int64_t l = 0; l < layers; ++l)
    std::memcpy(cache + l * cache_layer_stride + slot * cache_slot_stride, src + l * src_layer_stride,
                static_cast<size_t>(block_elems) * sizeof(T));
  return kOk;
}

// Rotates the temporal pairs of one head vector in place.
template <typename T>
void rebase_head(T* x, const RopeShiftTable& table) {
  for (int32_t j = 0; j < table.pairs; ++j) {
    float re = load_float(x[2 * j]), im = load_float(x[2 * j + 1]);
    rope_rotate_pair(&re, &im, table.cos[j], table.sin[j]);
    store_float(&x[2 * j], re);
    store_float(&x[2 * j + 1], im);
  }
}

template <typename T>
int rope_rebase(T* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
                double theta) {
  if (int status = kv_rope_rebase_check(keys, layers, slots, tokens, heads, head_dim); status != kOk) return status;
  RopeShiftTable table;
  rope_shift_table(head_dim, shift, theta, &table);
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t s = 0; s < slots; ++s)
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = 0; h < heads; ++h)
          rebase_head(keys + l * layer_stride + s * slot_stride + t * token_stride + h * head_stride, table);
  return kOk;
}

}  // namespace

namespace cpu {

int kv_write_block(const float* src, int64_t src_layer_stride, float* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems) {
  return write_block(src, src_layer_stride, cache, cache_layer_stride, cache_slot_stride, slot, layers, block_elems);
}

int kv_write_block(const f16* src, int64_t src_layer_stride, f16* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems) {
  return write_block(src, src_layer_stride, cache, cache_layer_stride, cache_slot_stride, slot, layers, block_elems);
}

int kv_rope_rebase(float* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
                   double theta) {
  return rope_rebase(keys, layers, slots, tokens, heads, head_dim, layer_stride, slot_stride, token_stride,
                     head_stride, shift, theta);
}

int kv_rope_rebase(f16* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
                   double theta) {
  return rope_rebase(keys, layers, slots, tokens, heads, head_dim, layer_stride, slot_stride, token_stride,
                     head_stride, shift, theta);
}

}  // namespace cpu

#ifndef SKYRT_WITH_CUDA
namespace cuda {
int kv_write_block(const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t, int64_t, void*) {
  return kNotCompiled;
}
int kv_write_block(const f16*, int64_t, f16*, int64_t, int64_t, int64_t, int64_t, int64_t, void*) {
  return kNotCompiled;
}
int kv_rope_rebase(float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                   double, void*) {
  return kNotCompiled;
}
int kv_rope_rebase(f16*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                   double, void*) {
  return kNotCompiled;
}
}  // namespace cuda
#endif

}  // namespace skyrt

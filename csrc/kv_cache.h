// kv_cache.h — ring KV cache for the kvcache rollout: slot bookkeeping (KVRing) and the two data
// operations on the preallocated buffers, writing a finished block into a slot (kv_write_block) and
// the RoPE rebase of cached keys (kv_rope_rebase).
//
// Buffers (owned by the caller, allocated once, never resized), per K and per V:
//   cache [layers, slots, tokens_per_block, heads, head_dim]   slots = sink_blocks + window_blocks
// A block's K/V is written whole into one slot; attention over keys is order-free, so evicting the
// oldest non-sink block is an overwrite of its slot and the slot tables say what each slot holds.
//
// RoPE rebase: keys are stored rotated at their temporal position p (frames, relative to the ring's
// origin). Rotating the temporal part of a key by -s turns "rotated at p" into "rotated at p - s",
// so shifting the origin keeps every new query/key inside the model's 1024-entry table forever
// while relative distances, and hence attention, stay exact. Only the temporal part is touched:
// the first d_t/2 complex pairs (x[2i], x[2i+1]) of each head, d_t = head_dim - 4*(head_dim//6),
// frequencies as the official rope_params: 1 / 10000^(arange(0, d_t, 2) / d_t) in float32.
// CPU references (kv_cache.cpp) and CUDA kernels (cuda/kv_cache.cu) share rope_shift_table and
// rope_rotate_pair and take the same arguments (the CUDA ones add a stream).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>
#include "common.h"
#include "half.h"

namespace skyrt {

// ---- RoPE math shared by host and device ---------------------------------------------------------

constexpr int kMaxRopePairs = 64;  // temporal pairs per head; head_dim 128 has 22, 256 has 44

SKYRT_HD int64_t rope_temporal_dim(int64_t head_dim) { return head_dim - 4 * (head_dim / 6); }

// Official rope_params frequency of complex pair `pair` in a part of width `dim`, rounded to
// float32 as torch computes it: 1 / theta^(float32(2*pair) / dim).
SKYRT_HD float rope_freq(int64_t pair, int64_t dim, double theta) {
  const float exponent = static_cast<float>(2 * pair) / static_cast<float>(dim);
  const float power = static_cast<float>(pow(theta, static_cast<double>(exponent)));
  return 1.0f / power;
}

// cos/sin of the rotation by -shift positions, per temporal pair; angles in double.
struct RopeShiftTable {
  int32_t pairs;
  float cos[kMaxRopePairs];
  float sin[kMaxRopePairs];
};

SKYRT_HD void rope_shift_table(int64_t head_dim, int64_t shift, double theta, RopeShiftTable* t) {
  const int64_t dim_t = rope_temporal_dim(head_dim);
  t->pairs = static_cast<int32_t>(dim_t / 2);
  for (int32_t j = 0; j < t->pairs && j < kMaxRopePairs; ++j) {
    const double angle = -static_cast<double>(shift) * static_cast<double>(rope_freq(j, dim_t, theta));
    t->cos[j] = static_cast<float>(cos(angle));
    t->sin[j] = static_cast<float>(sin(angle));
  }
}

// (re + i im) * (c + i s), in float.
SKYRT_HD void rope_rotate_pair(float* re, float* im, float c, float s) {
  const float r = *re, i = *im;
  *re = r * c - i * s;
  *im = r * s + i * c;
}

// ---- slot bookkeeping ----------------------------------------------------------------------------

struct KVAppend {
  int64_t slot = -1;           // where the block's K/V go (kv_write_block)
  int64_t evicted_block = -1;  // block whose slot was reused, -1 if none
  int64_t position = 0;        // RoPE temporal position of the block's first frame
};

// Sink slots [0, sink_blocks) take the first blocks appended and keep them; window slots
// [sink_blocks, capacity) form a ring in append order. Positions are frames relative to origin():
// block b's first frame sits at b * frames_per_block - origin().
// The ring's bookkeeping (rollout_state.h saves and restores it).
struct KVRingState {
  int64_t appended = 0, origin = 0, last_block = -1;
  std::vector<int64_t> slot_block, slot_position;  // [capacity]
};

class KVRing {
 public:
  static int check(int64_t sink_blocks, int64_t window_blocks, int64_t frames_per_block, std::string* why);
  KVRing(int64_t sink_blocks, int64_t window_blocks, int64_t frames_per_block);  // args must pass check

  int append(int64_t block, KVAppend* out);  // kInvalidArgument unless block > every earlier block
  void rebase(int64_t shift);                // origin += shift; run kv_rope_rebase(shift) on K too
  void reset();

  int64_t capacity() const { return sink_ + window_; }
  int64_t sink_blocks() const { return sink_; }
  int64_t window_blocks() const { return window_; }
  int64_t frames_per_block() const { return frames_per_block_; }
  int64_t size() const;  // valid slots
  int64_t appended() const { return appended_; }
  int64_t origin() const { return origin_; }
  int64_t position_of(int64_t block) const { return block * frames_per_block_ - origin_; }
  const std::vector<int64_t>& slot_block() const { return slot_block_; }        // [capacity], -1 = empty
  const std::vector<int64_t>& slot_position() const { return slot_position_; }  // [capacity], 0 if empty
  std::vector<int64_t> slots_in_order() const;  // valid slots, sinks first then window oldest first
  KVRingState state() const { return {appended_, origin_, last_block_, slot_block_, slot_position_}; }
  int set_state(const KVRingState& s, std::string* why);  // kOk, or kInvalidArgument with a reason

 private:
  int64_t sink_, window_, frames_per_block_;
  int64_t appended_ = 0, origin_ = 0, last_block_ = -1;
  std::vector<int64_t> slot_block_, slot_position_;
};

// ---- data operations: CPU references and CUDA kernels ---------------------------------------------
// kv_write_block: cache[l, slot, :] = src[l, :] for l < layers; the block_elems =
// tokens*heads*head_dim elements of one layer are contiguous in both; strides are in elements.
// kv_rope_rebase: rotate the temporal pairs of keys[l, s, t, h, :] by -shift positions for all
// l < layers, s < slots, t < tokens, h < heads; head_dim is contiguous, other strides in elements.

namespace cpu {
int kv_write_block(const float* src, int64_t src_layer_stride, float* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems);
int kv_write_block(const f16* src, int64_t src_layer_stride, f16* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems);
int kv_rope_rebase(float* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride,
                   int64_t shift, double theta);
int kv_rope_rebase(f16* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride,
                   int64_t shift, double theta);
}  // namespace cpu

namespace cuda {
int kv_write_block(const float* src, int64_t src_layer_stride, float* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems, void* stream);
int kv_write_block(const f16* src, int64_t src_layer_stride, f16* cache, int64_t cache_layer_stride,
                   int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems, void* stream);
int kv_rope_rebase(float* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride,
                   int64_t shift, double theta, void* stream);
int kv_rope_rebase(f16* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride,
                   int64_t shift, double theta, void* stream);
}  // namespace cuda

// Argument checks shared by both implementations (pointer validity aside, a kernel cannot check
// buffer sizes: the binding layer does).
inline int kv_write_block_check(const void* src, const void* cache, int64_t slot, int64_t layers,
                                int64_t block_elems) {
  if (slot < 0 || layers < 0 || block_elems < 0) return kInvalidArgument;
  if (layers > 0 && block_elems > 0 && (src == nullptr || cache == nullptr)) return kInvalidArgument;
  return kOk;
}

inline int kv_rope_rebase_check(const void* keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads,
                                int64_t head_dim) {
  if (layers < 0 || slots < 0 || tokens < 0 || heads < 0 || head_dim < 2 || head_dim % 2 != 0)
    return kInvalidArgument;
  if (rope_temporal_dim(head_dim) / 2 > kMaxRopePairs) return kInvalidArgument;
  if (layers * slots * tokens * heads > 0 && keys == nullptr) return kInvalidArgument;
  return kOk;
}

}  // namespace skyrt

// rolling_cache.h — Rolling-Forcing's cache policy over the rollout core's ring (TencentARC/RollingForcing,
// pipeline/rolling_forcing_inference.py and the self-attention of wan/modules/causal_model.py).
//
// Their sampler is the DF async schedule with ar_step = 1 and as many blocks in flight as steps (a
// rolling window of L blocks at staggered few-step timesteps, block j at step w - j of row w) and the
// fewstep sampler: both are the core's already. What differs is which keys each DiT call sees and where
// the sink's keys sit, which this policy decides per call (a "view"):
//
//   * a window call (the active blocks s .. s + n - 1, full attention among them: one attention block
//     of the whole step): s < k (k = the ring's sink blocks; theirs is 1): its own tokens only. Else
//     [sink ; working ; window] with working = the W = min(s - k, max(0, A - n - k)) finished blocks just
//     before s (A = their max_attention_size in blocks, 21 frames) at their own positions, and the sink
//     (blocks 0 .. k - 1, committed once) re-rotated to sit right before them: sink block i at frame
//     (s - W - k + i) * b.
//   * a commit (their clean pass of the window's oldest block s at t = context_noise): their cache
//     after the write is [sink ; blocks max(k, s - (C - k) + 1) .. s] (C = their kv_cache_clean size in
//     blocks, 24 frames: the eviction keeps the sink and drops the oldest); the pass attends to the
//     last A entries of it (itself included, so it loses the sink once the cache holds more than A
//     blocks), the sink at its own frames 0 .. k*b - 1.
//
// A block the ring no longer holds is left out of a view (a ring smaller than their cache, sink k +
// window C - k - 1 blocks, drops the oldest working blocks); with that ring every view is theirs.
//
// Moving the sink: cached keys are stored rotated at their temporal position, so placing the sink at
// a new frame is a rotation of its keys' temporal RoPE part by the difference — the RoPE rebase's CPU
// reference / CUDA kernel (kv_rope_rebase, cpu::/cuda::) on the sink slots of every context, no new
// kernel. The policy remembers where the sink's keys sit (absolute frames, so a ring rebase, which
// rotates every key and moves the origin alike, leaves it right).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "rollout.h"

namespace skyrt {

struct RollingCacheConfig {
  int64_t attention_frames = 21;  // their max_attention_size, in latent frames
  int64_t cache_frames = 24;      // their kv_cache_clean size, in latent frames
};

// What one DiT call sees.
struct RollingView {
  std::vector<uint8_t> slot_valid;  // [capacity] ring slots the call attends to besides its own frames
  int64_t attention_frames = 0;     // the attention block among the step's frames (the whole step: full)
  int64_t sink_position = 0;        // RoPE position (relative to the ring's origin) of the sink's first frame
  bool sink_visible = false;
};

class RollingCache {
 public:
  // kOk, or kInvalidArgument with a reason: frames that are not whole blocks of the core's block, a core
  // without a ring (window mode), a cache with no room beside its sink.
  static int check(const RolloutConfig& core, const RollingCacheConfig& cfg, std::string* why);
  RollingCache(const RolloutConfig& core, RollingCacheConfig cfg);  // must pass check

  // The window call of `count` active blocks from `first`; places the sink's keys (in core's cache_k).
  RollingView window(RolloutCore& core, int64_t first, int64_t count);
  // The commit (clean pass) of `block`, before core.commit writes it; places the sink's keys.
  RollingView commit(RolloutCore& core, int64_t block);

  int64_t attention_blocks() const { return attention_blocks_; }
  int64_t cache_blocks() const { return cache_blocks_; }
  int64_t sink_frame() const { return sink_frame_; }  // absolute frame the sink's keys sit at now
  // A resumed stream's: the frame its sink's keys sat at when its core's state was exported (the keys
  // come back with the core's cache_k, already rotated there; nothing is rotated here).
  void restore_sink_frame(int64_t frame) { sink_frame_ = frame; }

 private:
  RollingView view(RolloutCore& core, const std::vector<int64_t>& blocks, bool with_sink, int64_t sink_frame,
                   int64_t attention_frames);
  void place_sink(RolloutCore& core, int64_t frame);  // rotate the sink's keys to absolute `frame`

  RollingCacheConfig cfg_;
  int64_t block_frames_ = 1, attention_blocks_ = 0, cache_blocks_ = 0;
  int64_t sink_frame_ = 0;  // where the sink's keys sit (absolute frames); block 0 commits at frame 0
};

}  // namespace skyrt

// rolling_cache.cpp — Rolling-Forcing's cache policy (see rolling_cache.h). Bookkeeping on the host; the one
// data operation, the sink's re-rotation, runs kv_rope_rebase's CPU reference on host memory and its CUDA
// kernel on a GPU (the same dispatch as the rollout core's).
#include "rolling_cache.h"

#include <algorithm>
#include <stdexcept>

namespace skyrt {

#define SKYRT_RUN(cfg, fn, ...) ((cfg).device.cuda ? cuda::fn(__VA_ARGS__, (cfg).stream) : cpu::fn(__VA_ARGS__))

int RollingCache::check(const RolloutConfig& core, const RollingCacheConfig& cfg, std::string* why) {
  auto fail = [&](const std::string& message) {
    if (why != nullptr) *why = message;
    return kInvalidArgument;
  };
  const int64_t b = core.block_frames;
  if (core.recompute) return fail("the rolling cache needs a ring: window mode (recompute) keeps no K/V");
  if (b < 1 || cfg.attention_frames % b || cfg.cache_frames % b)
    return fail("attention_frames=" + std::to_string(cfg.attention_frames) + " and cache_frames=" +
                std::to_string(cfg.cache_frames) + " must be whole blocks of " + std::to_string(b) +
                " frames (their cache keeps whole blocks)");
  const int64_t k = core.sink_blocks, attention = cfg.attention_frames / b, cache = cfg.cache_frames / b;
  if (attention < k + 1 || cache < attention)
    return fail("attention_frames=" + std::to_string(cfg.attention_frames) + ", cache_frames=" +
                std::to_string(cfg.cache_frames) + ": need the sink (" + std::to_string(k) +
                " blocks) plus one block inside the attention, and a cache at least that long");
  return kOk;
}

RollingCache::RollingCache(const RolloutConfig& core, RollingCacheConfig cfg)
    : cfg_(cfg),
      block_frames_(core.block_frames),
      attention_blocks_(cfg.attention_frames / core.block_frames),
      cache_blocks_(cfg.cache_frames / core.block_frames) {
  std::string why;
  if (check(core, cfg, &why) != kOk) throw std::invalid_argument("RollingCache: " + why);
}

RollingView RollingCache::window(RolloutCore& core, int64_t first, int64_t count) {
  const int64_t k = core.ring().sink_blocks();
  const int64_t frames = count * block_frames_;
  if (first < k) return view(core, {}, false, 0, frames);  // the window still holds the sink: itself only
  const int64_t working = std::min(first - k, std::max<int64_t>(0, attention_blocks_ - count - k));
  std::vector<int64_t> blocks;
  for (int64_t j = first - working; j < first; ++j) blocks.push_back(j);
  return view(core, blocks, k > 0, (first - working - k) * block_frames_, frames);
}

RollingView RollingCache::commit(RolloutCore& core, int64_t block) {
  const int64_t k = core.ring().sink_blocks();
  if (block < k) {  // a sink block: the sink blocks before it (all the ring holds), at their own frames
    RollingView v = view(core, {}, block > 0, 0, block_frames_);
    sink_frame_ = 0;  // it is written at its own frame, beside them
    return v;
  }
  // Their cache after the write: [sink ; blocks max(k, block - (C - k) + 1) .. block]; the pass sees its
  // last A entries, itself one of them.
  const int64_t kept_from = std::max(k, block - (cache_blocks_ - k) + 1);
  const int64_t entries = k + (block - kept_from + 1);
  const int64_t dropped = std::max<int64_t>(0, entries - attention_blocks_);  // from the front: sink first
  const bool with_sink = k > 0 && dropped == 0;
  if (dropped > 0 && dropped < k)
    throw std::logic_error("rolling cache: the clean pass would see part of the sink (sink_blocks > 1)");
  std::vector<int64_t> blocks;
  for (int64_t j = std::max(kept_from, kept_from + dropped - k); j < block; ++j) blocks.push_back(j);
  return view(core, blocks, with_sink, 0, block_frames_);
}

RollingView RollingCache::view(RolloutCore& core, const std::vector<int64_t>& blocks, bool with_sink,
                               int64_t sink_frame, int64_t attention_frames) {
  const KVRing& ring = core.ring();
  const auto& slot_block = ring.slot_block();
  RollingView v;
  v.slot_valid.assign(slot_block.size(), 0);
  v.attention_frames = attention_frames;
  for (size_t s = 0; s < slot_block.size(); ++s) {
    const int64_t held = slot_block[s];
    if (held < 0) continue;
    const bool sink = static_cast<int64_t>(s) < ring.sink_blocks();
    // A ring smaller than their cache no longer holds the oldest blocks: they are simply left out.
    if (sink ? with_sink : std::find(blocks.begin(), blocks.end(), held) != blocks.end()) v.slot_valid[s] = 1;
  }
  v.sink_visible = with_sink;
  if (with_sink) place_sink(core, sink_frame);
  v.sink_position = sink_frame_ - ring.origin();
  return v;
}

void RollingCache::place_sink(RolloutCore& core, int64_t frame) {
  const int64_t shift = sink_frame_ - frame;  // kv_rope_rebase rotates by -shift: from sink_frame_ to frame
  if (shift == 0) return;
  const RolloutConfig& cfg = core.config();
  const int64_t B = cfg.contexts, slots = core.ring().capacity(), k = core.ring().sink_blocks();
  const int64_t tokens = cfg.block_frames * cfg.tokens_per_frame, hd = cfg.head_dim;
  const int64_t kvb = tokens * cfg.heads * hd;
  // cache_k [layers, B, slots * kvb]: the sink slots 0 .. k-1 of every (layer, context), (layer, context)
  // flattened into one "layer" axis of stride slots * kvb.
  Buffer keys = core.buffer("cache_k", 0);
  int status;
  if (cfg.kv_dtype == kFloat16)
    status = SKYRT_RUN(cfg, kv_rope_rebase, static_cast<f16*>(keys.ptr), cfg.layers * B, k, tokens, cfg.heads, hd,
                       slots * kvb, kvb, cfg.heads * hd, hd, shift, cfg.rope_theta);
  else
    status = SKYRT_RUN(cfg, kv_rope_rebase, static_cast<float*>(keys.ptr), cfg.layers * B, k, tokens, cfg.heads, hd,
                       slots * kvb, kvb, cfg.heads * hd, hd, shift, cfg.rope_theta);
  if (status != kOk) throw std::runtime_error(std::string("rolling cache: kv_rope_rebase: ") + status_message(status));
  sink_frame_ = frame;
}

#undef SKYRT_RUN

}  // namespace skyrt

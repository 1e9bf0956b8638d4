// rollout.cpp — the rollout core (see rollout.h). Every data operation goes through SKYRT_RUN, which
// calls the CPU reference on host memory and the CUDA kernel on a GPU with the same arguments.
#include "rollout.h"

#include <algorithm>
#include <stdexcept>

#include "guidance.h"

namespace skyrt {

// One operation, two implementations: cpu::fn(args...) on the host, cuda::fn(args..., stream) on a GPU.
#define SKYRT_RUN(cfg, fn, ...) ((cfg).device.cuda ? cuda::fn(__VA_ARGS__, (cfg).stream) : cpu::fn(__VA_ARGS__))

namespace {

bool fail(std::string* why, const std::string& message) {
  if (why != nullptr) *why = message;
  return false;
}

// The DF schedule a rollout configuration asks for (one place, for the check and the core).
DFScheduleConfig schedule_config(const RolloutConfig& c) {
  DFScheduleConfig s;
  s.step_template = c.step_template;
  s.ar_step = c.ar_step;
  s.causal_block_size = c.block_frames;
  s.num_prefix_blocks = c.prefix_blocks;
  s.max_blocks_in_flight = c.max_blocks_in_flight;
  s.horizon_blocks = c.horizon_blocks;
  return s;
}

bool fewstep_sigmas_ok(const RolloutConfig& c) {
  const size_t steps = c.step_template.size();
  if (c.renoise_sigmas.size() != steps || c.sigmas.size() != steps + 1) return false;
  for (const auto* table : {&c.sigmas, &c.renoise_sigmas})
    for (double s : *table)
      if (!(s >= 0.0 && s <= 1.0)) return false;
  return true;
}

// Window mode: one finite window, every block of it in flight at once.
bool check_window_mode(const RolloutConfig& c, std::string* why) {
  if (c.horizon_blocks < 1) return fail(why, "window mode needs a window of at least one block (window_blocks = horizon_blocks >= 1)");
  if (c.max_blocks_in_flight != c.horizon_blocks)
    return fail(why, "window mode keeps every block of the window in flight: max_blocks_in_flight must equal "
                     "horizon_blocks (" + std::to_string(c.horizon_blocks) + ")");
  if (c.end_blocks < 0 || c.prefix_blocks + c.end_blocks > c.horizon_blocks)
    return fail(why, "prefix_blocks + end_blocks (" + std::to_string(c.prefix_blocks + c.end_blocks) +
                     ") must be within the window's " + std::to_string(c.horizon_blocks) + " blocks");
  if (!(c.addnoise_condition >= 0.0 && c.addnoise_condition < 1000.0))
    return fail(why, "addnoise_condition must be in [0, 1000); 20 is recommended");
  return true;
}

bool check_config(const RolloutConfig& c, std::string* why) {
  const int64_t steps = static_cast<int64_t>(c.step_template.size());
  if (steps < 1) return fail(why, "step_template must hold at least one timestep");
  if (static_cast<int64_t>(c.sigmas.size()) != steps + 1)
    return fail(why, "sigmas must hold num_steps + 1 values (the sampler's sigmas and a final 0), got " +
                         std::to_string(c.sigmas.size()) + " for " + std::to_string(steps) + " steps");
  if (c.sampler != "unipc" && c.sampler != "euler" && c.sampler != "fewstep")
    return fail(why, "sampler '" + c.sampler + "' is not one of 'unipc', 'euler', 'fewstep'");
  if (!c.step_timesteps.empty() && static_cast<int64_t>(c.step_timesteps.size()) != steps)
    return fail(why, "step_timesteps must hold one timestep per step (" + std::to_string(steps) + "), got " +
                         std::to_string(c.step_timesteps.size()));
  if (c.sampler == "fewstep" && !fewstep_sigmas_ok(c))
    return fail(why, "the fewstep sampler needs sigmas [S + 1] and renoise_sigmas [S], every value in [0, 1]");
  if (c.sampler == "unipc" && steps >= 2 && c.step_template[0] == c.step_template[1])
    return fail(why, "the first two timesteps are equal (" + std::to_string(c.step_template[0]) +
                         "): the official UniPC would start at its second step and run out one step early; "
                         "use fewer steps or a smaller shift");
  if (c.channels < 1 || c.height < 1 || c.width < 1 || c.tokens_per_frame < 1)
    return fail(why, "channels, height, width and tokens_per_frame must be >= 1");
  if (c.layers < 1 || c.heads < 1 || c.head_dim < 2 || c.head_dim % 2)
    return fail(why, "layers and heads must be >= 1 and head_dim an even number >= 2");
  if (rope_temporal_dim(c.head_dim) / 2 > kMaxRopePairs)
    return fail(why, "head_dim " + std::to_string(c.head_dim) + " has more temporal RoPE pairs than the core supports");
  if (c.contexts != 1 && c.contexts != 2)
    return fail(why, "contexts must be 1 (no guidance) or 2 (classifier-free guidance: cond and uncond)");
  if (c.kv_dtype != kFloat32 && c.kv_dtype != kFloat16) return fail(why, "kv_dtype must be float32 or float16");
  if (c.recompute && !check_window_mode(c, why)) return false;
  if (c.max_blocks_in_flight < 1) return fail(why, "max_blocks_in_flight must be >= 1");
  std::string ring_why;
  if (KVRing::check(c.sink_blocks, c.window_blocks, c.block_frames, &ring_why) != kOk) return fail(why, ring_why);
  return df_schedule_check(schedule_config(c), why) == kOk;
}

DFSchedule make_schedule(const RolloutConfig& c) { return DFSchedule(schedule_config(c)); }

// Blocks a LongLive recache chunk may hold: sink + window + 1 (0 without that policy).
int64_t recache_chunk_blocks(const RolloutConfig& c) {
  return c.longlive_recache ? c.sink_blocks + c.window_blocks + 1 : 0;
}

void check_status(int status, const std::string& what) {
  if (status != kOk) throw std::runtime_error("rollout core: " + what + ": " + status_message(status));
}

Buffer upload_table(const std::vector<float>& host, const RolloutConfig& cfg) {
  Buffer b = allocate(cfg.device, kFloat32, {static_cast<int64_t>(host.size())}, false, cfg.stream);
  check_status(copy_bytes(b.ptr, cfg.device, host.data(), Device{}, host.size() * sizeof(float), cfg.stream),
               "sampler table upload");
  return b;
}

// ---- samplers ------------------------------------------------------------------------------------

// The official FlowUniPC (order 2, bh2) with per-step coefficients for all S steps, computed once on
// the host in double and kept on the device: [S][b] rows of UniPCFrameCoeffs.
class UniPCSampler : public BlockSampler {
 public:
  explicit UniPCSampler(const RolloutConfig& cfg) : cfg_(cfg) {
    const int64_t steps = static_cast<int64_t>(cfg.step_template.size()), b = cfg.block_frames;
    std::vector<float> host(static_cast<size_t>(steps * b * kUniPCCoeffs));
    std::vector<int64_t> k_of_frame(static_cast<size_t>(b));
    for (int64_t k = 0; k < steps; ++k) {
      std::fill(k_of_frame.begin(), k_of_frame.end(), k);
      auto* rows = reinterpret_cast<UniPCFrameCoeffs*>(host.data() + k * b * kUniPCCoeffs);
      if (unipc_frame_coeffs(cfg.sigmas.data(), steps + 1, k_of_frame.data(), b, rows) != kOk)
        throw std::invalid_argument("rollout core: sigmas must lie in (0, 1) with a final value in [0, 1)");
    }
    table_ = upload_table(host, cfg);
  }
  int history_buffers() const override { return 3; }  // x_last, m1, m2
  int step(BlockState& s, const float* v, const float*, int64_t k) override {
    const auto* coeffs = reinterpret_cast<const UniPCFrameCoeffs*>(static_cast<const float*>(table_.ptr) +
                                                                   k * cfg_.block_frames * kUniPCCoeffs);
    auto* x = static_cast<float*>(s.latents.ptr);
    return SKYRT_RUN(cfg_, flow_unipc, x, v, x, static_cast<float*>(s.history[0].ptr),
                     static_cast<float*>(s.history[1].ptr), static_cast<float*>(s.history[2].ptr), coeffs,
                     cfg_.channels, cfg_.block_frames, cfg_.height * cfg_.width, cfg_.official_df_aliasing);
  }

 private:
  RolloutConfig cfg_;
  Buffer table_;
};

// Flow-matching Euler: x += (sigma_{k+1} - sigma_k) v, the difference taken in float32 as the
// official float32 sigma tensor gives it. dt table [S][b].
class EulerSampler : public BlockSampler {
 public:
  explicit EulerSampler(const RolloutConfig& cfg) : cfg_(cfg) {
    const int64_t steps = static_cast<int64_t>(cfg.step_template.size()), b = cfg.block_frames;
    std::vector<float> host(static_cast<size_t>(steps * b));
    for (int64_t k = 0; k < steps; ++k)
      for (int64_t f = 0; f < b; ++f)
        host[static_cast<size_t>(k * b + f)] =
            static_cast<float>(cfg.sigmas[static_cast<size_t>(k + 1)]) - static_cast<float>(cfg.sigmas[static_cast<size_t>(k)]);
    table_ = upload_table(host, cfg);
  }
  int history_buffers() const override { return 0; }
  int step(BlockState& s, const float* v, const float*, int64_t k) override {
    auto* x = static_cast<float*>(s.latents.ptr);
    const float* dt = static_cast<const float*>(table_.ptr) + k * cfg_.block_frames;
    return SKYRT_RUN(cfg_, flow_euler, x, v, x, dt, static_cast<const uint8_t*>(nullptr), cfg_.channels,
                     cfg_.block_frames, cfg_.height * cfg_.width);
  }

 private:
  RolloutConfig cfg_;
  Buffer table_;
};

// The causal Wan family's few-step sampler: per block step k, x0 = x - σ_k v (float64, rounded to
// float32), then re-noised to σ'_{k+1} from the driver's fresh noise, or x0 itself after the last
// step. No history; no table on the device (one σ per block step: kernel arguments).
class FewStepSampler : public BlockSampler {
 public:
  explicit FewStepSampler(const RolloutConfig& cfg) : cfg_(cfg), steps_(static_cast<int64_t>(cfg.step_template.size())) {}
  int history_buffers() const override { return 0; }
  bool needs_step_noise(int64_t k) const override { return k + 1 < steps_; }
  int step(BlockState& s, const float* v, const float* noise, int64_t k) override {
    auto* x = static_cast<float*>(s.latents.ptr);
    const int64_t n = cfg_.channels * cfg_.block_frames * cfg_.height * cfg_.width;
    const auto sigma = static_cast<float>(cfg_.sigmas[static_cast<size_t>(k)]);
    const bool last = k + 1 >= steps_;
    const auto next = last ? 0.0f : static_cast<float>(cfg_.renoise_sigmas[static_cast<size_t>(k + 1)]);
    return SKYRT_RUN(cfg_, flow_fewstep, x, v, last ? nullptr : noise, x, n, sigma, next);
  }

 private:
  RolloutConfig cfg_;
  int64_t steps_;
};

}  // namespace

int rollout_check(const RolloutConfig& cfg, std::string* why) { return check_config(cfg, why) ? kOk : kInvalidArgument; }

std::unique_ptr<BlockSampler> make_block_sampler(const RolloutConfig& cfg) {
  if (cfg.sampler == "euler") return std::make_unique<EulerSampler>(cfg);
  if (cfg.sampler == "fewstep") return std::make_unique<FewStepSampler>(cfg);
  return std::make_unique<UniPCSampler>(cfg);
}

// ---- the core --------------------------------------------------------------------------------------

RolloutCore::RolloutCore(RolloutConfig cfg)
    : cfg_(std::move(cfg)),
      schedule_(make_schedule(cfg_)),
      ring_(cfg_.sink_blocks, cfg_.window_blocks, cfg_.block_frames) {
  const Device d = cfg_.device;
  void* s = cfg_.stream;
  sampler_ = make_block_sampler(cfg_);
  const int64_t B = cfg_.contexts, C = cfg_.channels, b = cfg_.block_frames, h = cfg_.height, w = cfg_.width;
  const int64_t W = cfg_.max_blocks_in_flight, slots = ring_.capacity();
  max_frames_ = std::max(W, recache_chunk_blocks(cfg_)) * b;
  slots_.resize(static_cast<size_t>(W));
  bool noised = false;
  for (int64_t k = 0; k < schedule_.num_steps(); ++k) noised = noised || sampler_->needs_step_noise(k);
  for (BlockState& st : slots_) {
    st.latents = allocate(d, kFloat32, {C, b, h, w}, false, s);
    for (int i = 0; i < sampler_->history_buffers(); ++i) st.history.push_back(allocate(d, kFloat32, {C, b, h, w}, false, s));
    if (noised) st.step_noise = allocate(d, kFloat32, {C, b, h, w}, false, s);
  }
  if (cfg_.longlive_recache) evicted_ = allocate(d, kFloat32, {C, b, h, w}, false, s);
  latents_in_ = allocate(d, kFloat32, {B, C, max_frames_, h, w}, true, s);
  velocity_ = allocate(d, kFloat32, {B, C, max_frames_, h, w}, true, s);
  // Window mode recomputes every frame each row: no K/V is kept, so the K/V buffers hold zero tokens.
  const int64_t kv_frames = cfg_.recompute ? 0 : max_frames_;
  const int64_t tokens = kv_frames * cfg_.tokens_per_frame, cached = cfg_.recompute ? 0 : slots * b * cfg_.tokens_per_frame;
  new_k_ = allocate(d, cfg_.kv_dtype, {cfg_.layers, B, tokens, cfg_.heads, cfg_.head_dim}, true, s);
  new_v_ = allocate(d, cfg_.kv_dtype, {cfg_.layers, B, tokens, cfg_.heads, cfg_.head_dim}, true, s);
  // Zeros, not garbage: a masked slot must still hold finite values (NaN * 0 poisons the softmax).
  cache_k_ = allocate(d, cfg_.kv_dtype, {cfg_.layers, B, cached, cfg_.heads, cfg_.head_dim}, true, s);
  cache_v_ = allocate(d, cfg_.kv_dtype, {cfg_.layers, B, cached, cfg_.heads, cfg_.head_dim}, true, s);
  store_ = allocate(d, kFloat32, {slots, C, b, h, w}, true, s);
  scratch_ = allocate(d, kFloat32, {C, b, h, w}, false, s);
  if (cfg_.recompute) {
    window_ = allocate(d, kFloat32, {C, max_frames_, h, w}, false, s);
    condition_noise_ = allocate(d, kFloat32, {C, cfg_.prefix_blocks * b, h, w}, false, s);
  }
  slot_t_.assign(static_cast<size_t>(slots), 0.0);
  slot_block_.assign(static_cast<size_t>(slots), -1);
  check(synchronize(d, s), "allocation");
}

void RolloutCore::check(int status, const char* what) const { check_status(status, what); }

BlockState& RolloutCore::state_of(int64_t block) {
  return slots_[static_cast<size_t>(block % cfg_.max_blocks_in_flight)];
}

int64_t RolloutCore::in_flight() const {
  int64_t n = 0;
  for (const BlockState& s : slots_) n += s.block >= 0;
  return n;
}

int64_t RolloutCore::steps_taken(int64_t block) const {
  if (block < 0 || slots_[static_cast<size_t>(block % cfg_.max_blocks_in_flight)].block != block)
    throw std::invalid_argument("rollout core: block " + std::to_string(block) + " is not in flight");
  return slots_[static_cast<size_t>(block % cfg_.max_blocks_in_flight)].steps;
}

bool RolloutCore::next_row(RowPlan* plan) {
  DFStep step;
  if (!schedule_.next(&step)) return false;
  const int64_t steps = schedule_.num_steps();
  *plan = RowPlan{};
  plan->row = step.row;
  for (size_t i = 0; i < step.index.size(); ++i) {
    const int64_t idx = step.index[i];
    if (idx < 1 || idx > steps) continue;
    const int64_t blk = step.first + static_cast<int64_t>(i);
    if (pinned(blk)) continue;  // window mode's end-image blocks never move
    plan->active.push_back(blk);
    plan->timesteps.push_back(cfg_.step_timesteps.empty() ? static_cast<double>(step.timestep[i])
                                                          : cfg_.step_timesteps[static_cast<size_t>(idx - 1)]);
    plan->update.push_back(step.update[i]);
    BlockState& st = state_of(blk);
    if (st.block != blk) {
      if (st.block >= 0)
        throw std::logic_error("rollout core: block " + std::to_string(blk) + " needs the slot of block " +
                               std::to_string(st.block) + ", still in flight (max_blocks_in_flight too small)");
      st.block = blk;
      st.steps = 0;
      plan->started.push_back(blk);
    }
    if (step.update[i] && sampler_->needs_step_noise(st.steps)) plan->step_noise.push_back(blk);
  }
  for (int64_t blk : step.finished)
    if (!pinned(blk)) plan->finished.push_back(blk);
  active_ = plan->active;
  active_update_.assign(plan->update.begin(), plan->update.end());
  return true;
}

void RolloutCore::start_block(int64_t block, const float* noise) {
  BlockState& st = state_of(block);
  if (st.block != block || st.steps != 0)
    throw std::logic_error("rollout core: start_block(" + std::to_string(block) + ") for a block the last row did not start");
  check(copy_bytes(st.latents.ptr, cfg_.device, noise, Device{}, st.latents.nbytes(), cfg_.stream), "start_block");
}

int64_t RolloutCore::pack_active() {
  const int64_t C = cfg_.channels, b = cfg_.block_frames, hw = cfg_.height * cfg_.width;
  const int64_t F = static_cast<int64_t>(active_.size()) * b;
  const size_t f32 = sizeof(float);
  for (int64_t ctx = 0; ctx < cfg_.contexts; ++ctx)
    for (size_t i = 0; i < active_.size(); ++i) {
      float* dst = static_cast<float*>(latents_in_.ptr) + (ctx * C * F + static_cast<int64_t>(i) * b) * hw;
      check(copy_rows(dst, F * hw * f32, state_of(active_[i]).latents.ptr, b * hw * f32, b * hw * f32, C,
                      cfg_.device, cfg_.stream),
            "pack_active");
    }
  frames_ = F;
  return F;
}

void RolloutCore::apply_velocity() {
  const int64_t C = cfg_.channels, b = cfg_.block_frames, hw = cfg_.height * cfg_.width, F = frames_;
  const size_t f32 = sizeof(float);
  float* v = static_cast<float*>(velocity_.ptr);
  if (cfg_.contexts == 2)  // velocity[0] <- uncond + g (cond - uncond), in place
    check(SKYRT_RUN(cfg_, cfg_combine, v, v + C * F * hw, v, static_cast<size_t>(C * F * hw), cfg_.guidance_scale),
          "cfg_combine");
  for (size_t i = 0; i < active_.size(); ++i) {
    if (!active_update_[i]) continue;
    BlockState& st = state_of(active_[i]);
    // Where the block's frames are in the step: packed in order (kvcache), or at its place in the window.
    const int64_t first_frame = (cfg_.recompute ? active_[i] : static_cast<int64_t>(i)) * b;
    // The block's frames of the guided velocity [C, F, hw] -> a contiguous [C, b, hw] for the sampler.
    check(copy_rows(scratch_.ptr, b * hw * f32, v + first_frame * hw, F * hw * f32, b * hw * f32, C,
                    cfg_.device, cfg_.stream),
          "apply_velocity");
    const bool noised = sampler_->needs_step_noise(st.steps);
    if (noised && !st.noise_ready)
      throw std::logic_error("rollout core: block " + std::to_string(active_[i]) + " needs its step noise " +
                             "(set_step_noise for every block of plan.step_noise) before apply_velocity");
    check(sampler_->step(st, static_cast<const float*>(scratch_.ptr),
                         noised ? static_cast<const float*>(st.step_noise.ptr) : nullptr, st.steps),
          "sampler step");
    st.noise_ready = false;
    ++st.steps;
  }
}

void RolloutCore::set_step_noise(int64_t block, const float* noise) {
  BlockState& st = state_of(block);
  if (st.block != block || !sampler_->needs_step_noise(st.steps))
    throw std::logic_error("rollout core: set_step_noise(" + std::to_string(block) + "): the '" + cfg_.sampler +
                           "' sampler takes no fresh noise for that block's next step");
  check(copy_bytes(st.step_noise.ptr, cfg_.device, noise, Device{}, st.step_noise.nbytes(), cfg_.stream),
        "set_step_noise");
  st.noise_ready = true;
}

int64_t RolloutCore::next_slot() const {
  const int64_t n = ring_.appended(), sink = ring_.sink_blocks();
  return n < sink ? n : sink + (n - sink) % ring_.window_blocks();
}

void RolloutCore::finish_block(int64_t block) {
  BlockState& st = state_of(block);
  if (st.block != block || st.steps != schedule_.num_steps())
    throw std::logic_error("rollout core: finish_block(" + std::to_string(block) + ") before its last step");
  keep_evicted_input(next_slot());
  float* dst = static_cast<float*>(store_.ptr) + next_slot() * block_elems();
  check(copy_bytes(dst, cfg_.device, st.latents.ptr, cfg_.device, st.latents.nbytes(), cfg_.stream), "finish_block");
  st.block = -1;
  st.steps = 0;
}

void RolloutCore::load_commit_input(const float* x, const float* noise, double factor) {
  keep_evicted_input(next_slot());
  float* dst = static_cast<float*>(store_.ptr) + next_slot() * block_elems();
  const size_t bytes = static_cast<size_t>(block_elems()) * sizeof(float);
  check(copy_bytes(dst, cfg_.device, x, Device{}, bytes, cfg_.stream), "load_commit_input");
  if (noise == nullptr) return;
  check(copy_bytes(scratch_.ptr, cfg_.device, noise, Device{}, bytes, cfg_.stream), "load_commit_input noise");
  check(SKYRT_RUN(cfg_, addnoise_condition, dst, static_cast<const float*>(scratch_.ptr), dst, int64_t{1},
                  int64_t{1}, block_elems(), int64_t{0}, int64_t{1}, factor),
        "addnoise_condition");
}

void RolloutCore::pack_store(int64_t slot) {
  if (slot < 0 || slot >= ring_.capacity()) throw std::out_of_range("rollout core: slot out of range");
  const size_t bytes = static_cast<size_t>(block_elems()) * sizeof(float);
  const float* src = static_cast<const float*>(store_.ptr) + slot * block_elems();
  for (int64_t ctx = 0; ctx < cfg_.contexts; ++ctx)
    check(copy_bytes(static_cast<float*>(latents_in_.ptr) + ctx * block_elems(), cfg_.device, src, cfg_.device, bytes,
                     cfg_.stream),
          "pack_store");
  frames_ = cfg_.block_frames;
}

int64_t RolloutCore::commit(int64_t block, double t_commit) {
  const int64_t expected = next_slot();
  KVAppend a;
  if (ring_.append(block, &a) != kOk)
    throw std::invalid_argument("rollout core: blocks must be committed in increasing order (got " +
                                std::to_string(block) + ")");
  if (a.slot != expected) throw std::logic_error("rollout core: ring slot bookkeeping disagrees");
  write_kv(a.slot);
  slot_t_[static_cast<size_t>(a.slot)] = t_commit;
  slot_block_[static_cast<size_t>(a.slot)] = block;
  return a.slot;
}

void RolloutCore::write_kv(int64_t slot, int64_t index) {
  // new_k / new_v of the last step: [layers, B, blocks * kvb] for its `blocks` blocks of frames.
  const int64_t blocks = frames_ / cfg_.block_frames;
  if (frames_ % cfg_.block_frames || index < 0 || index >= blocks)
    throw std::logic_error("rollout core: write_kv(slot, " + std::to_string(index) + ") needs a step over whole blocks "
                           "that holds block " + std::to_string(index) + " (pack_store or pack_recache first)");
  if (slot < 0 || slot >= ring_.capacity()) throw std::out_of_range("rollout core: slot out of range");
  const int64_t B = cfg_.contexts, kvb = kv_block_elems(), slots = ring_.capacity();
  const int64_t src_ctx = blocks * kvb, src_layer = B * src_ctx, at = index * kvb;
  for (const auto& [src_buf, dst_buf] : {std::pair{&new_k_, &cache_k_}, std::pair{&new_v_, &cache_v_}})
    for (int64_t ctx = 0; ctx < B; ++ctx) {
      int status;
      if (cfg_.kv_dtype == kFloat16) {
        const f16* src = static_cast<const f16*>(src_buf->ptr) + ctx * src_ctx + at;
        f16* dst = static_cast<f16*>(dst_buf->ptr) + ctx * slots * kvb;
        status = SKYRT_RUN(cfg_, kv_write_block, src, src_layer, dst, B * slots * kvb, kvb, slot, cfg_.layers, kvb);
      } else {
        const float* src = static_cast<const float*>(src_buf->ptr) + ctx * src_ctx + at;
        float* dst = static_cast<float*>(dst_buf->ptr) + ctx * slots * kvb;
        status = SKYRT_RUN(cfg_, kv_write_block, src, src_layer, dst, B * slots * kvb, kvb, slot, cfg_.layers, kvb);
      }
      check(status, "kv_write_block");
    }
}

// ---- LongLive's recache ------------------------------------------------------------------------------

void RolloutCore::keep_evicted_input(int64_t slot) {
  const int64_t leaving = slot_block_[static_cast<size_t>(slot)];
  if (!cfg_.longlive_recache || leaving < 0) return;
  const float* src = static_cast<const float*>(store_.ptr) + slot * block_elems();
  check(copy_bytes(evicted_.ptr, cfg_.device, src, cfg_.device, evicted_.nbytes(), cfg_.stream), "keep_evicted_input");
  evicted_block_ = leaving;
}

const float* RolloutCore::committed_input(int64_t block) const {
  for (int64_t s = 0; s < ring_.capacity(); ++s)
    if (slot_block_[static_cast<size_t>(s)] == block) return static_cast<const float*>(store_.ptr) + s * block_elems();
  if (block == evicted_block_) return static_cast<const float*>(evicted_.ptr);
  throw std::logic_error("rollout core: the committed input of block " + std::to_string(block) + " is gone");
}

RecachePlan RolloutCore::pack_recache() {
  if (!cfg_.longlive_recache)
    throw std::logic_error("rollout core: pack_recache needs longlive_recache=True when the core is made");
  const int64_t j = ring_.appended(), sink = ring_.sink_blocks(), window = ring_.window_blocks();
  RecachePlan plan;
  plan.slot_valid.assign(static_cast<size_t>(ring_.capacity()), 0);
  const int64_t first = j <= sink + window + 1 ? 0 : j - window - 1;
  for (int64_t blk = first; blk < j; ++blk) plan.blocks.push_back(blk);
  if (first > 0)  // the sink keeps its K/V and is attended to as it is
    for (int64_t s = 0; s < sink; ++s) plan.slot_valid[static_cast<size_t>(s)] = ring_.slot_block()[static_cast<size_t>(s)] >= 0;
  const int64_t C = cfg_.channels, b = cfg_.block_frames, hw = cfg_.height * cfg_.width;
  const int64_t F = static_cast<int64_t>(plan.blocks.size()) * b;
  const size_t f32 = sizeof(float);
  for (int64_t ctx = 0; ctx < cfg_.contexts && F > 0; ++ctx)
    for (size_t i = 0; i < plan.blocks.size(); ++i) {
      float* dst = static_cast<float*>(latents_in_.ptr) + (ctx * C * F + static_cast<int64_t>(i) * b) * hw;
      check(copy_rows(dst, F * hw * f32, committed_input(plan.blocks[i]), b * hw * f32, b * hw * f32, C, cfg_.device,
                      cfg_.stream),
            "pack_recache");
    }
  plan.frames = F;
  plan.position = F > 0 ? ring_.position_of(first) : 0;
  frames_ = F;
  recache_ = plan;
  return plan;
}

void RolloutCore::write_recache() {
  if (frames_ != recache_.frames || recache_.blocks.empty())
    throw std::logic_error("rollout core: write_recache follows pack_recache and its DiT step");
  for (size_t i = 0; i < recache_.blocks.size(); ++i)
    for (int64_t s = 0; s < ring_.capacity(); ++s)
      if (slot_block_[static_cast<size_t>(s)] == recache_.blocks[i]) write_kv(s, static_cast<int64_t>(i));
  recache_ = RecachePlan{};
}

void RolloutCore::rebase(int64_t shift) {
  ring_.rebase(shift);
  const int64_t B = cfg_.contexts, kvb = kv_block_elems(), slots = ring_.capacity();
  const int64_t tokens = cfg_.block_frames * cfg_.tokens_per_frame, hd = cfg_.head_dim;
  int status;
  if (cfg_.kv_dtype == kFloat16)
    status = SKYRT_RUN(cfg_, kv_rope_rebase, static_cast<f16*>(cache_k_.ptr), cfg_.layers, B * slots, tokens,
                       cfg_.heads, hd, B * slots * kvb, kvb, cfg_.heads * hd, hd, shift, cfg_.rope_theta);
  else
    status = SKYRT_RUN(cfg_, kv_rope_rebase, static_cast<float*>(cache_k_.ptr), cfg_.layers, B * slots, tokens,
                       cfg_.heads, hd, B * slots * kvb, kvb, cfg_.heads * hd, hd, shift, cfg_.rope_theta);
  check(status, "kv_rope_rebase");
}

void RolloutCore::read_store(int64_t slot, float* out) const {
  if (slot < 0 || slot >= ring_.capacity()) throw std::out_of_range("rollout core: slot out of range");
  const float* src = static_cast<const float*>(store_.ptr) + slot * block_elems();
  check(copy_bytes(out, Device{}, src, cfg_.device, static_cast<size_t>(block_elems()) * sizeof(float), cfg_.stream),
        "read_store");
}

// ---- window mode ---------------------------------------------------------------------------------

void RolloutCore::require_recompute(const char* what) const {
  if (!cfg_.recompute)
    throw std::logic_error(std::string("rollout core: ") + what + " is window mode's (a core made with recompute)");
}

// window_ [C, F, hw] <-> block k's latents [C, b, hw] at frames [k b, (k + 1) b), every block.
void RolloutCore::copy_window_blocks(bool into_slots) const {
  const int64_t C = cfg_.channels, b = cfg_.block_frames, hw = cfg_.height * cfg_.width, F = max_frames_;
  const size_t f32 = sizeof(float), row = static_cast<size_t>(b * hw) * f32, pitch = static_cast<size_t>(F * hw) * f32;
  for (int64_t blk = 0; blk < cfg_.horizon_blocks; ++blk) {
    float* window = static_cast<float*>(window_.ptr) + blk * b * hw;
    void* latents = slots_[static_cast<size_t>(blk)].latents.ptr;
    const int status = into_slots ? copy_rows(latents, row, window, pitch, row, C, cfg_.device, cfg_.stream)
                                  : copy_rows(window, pitch, latents, row, row, C, cfg_.device, cfg_.stream);
    check(status, "window blocks");
  }
}

void RolloutCore::load_window(const float* z) {
  require_recompute("load_window");
  if (schedule_.rows() != 0) throw std::logic_error("rollout core: load_window after the first row");
  check(copy_bytes(window_.ptr, cfg_.device, z, Device{}, window_.nbytes(), cfg_.stream), "load_window");
  copy_window_blocks(true);
}

void RolloutCore::set_condition_noise(const float* noise) {
  require_recompute("set_condition_noise");
  check(copy_bytes(condition_noise_.ptr, cfg_.device, noise, Device{}, condition_noise_.nbytes(), cfg_.stream),
        "set_condition_noise");
  condition_noise_set_ = true;
}

int64_t RolloutCore::pack_window() {
  require_recompute("pack_window");
  const int64_t C = cfg_.channels, b = cfg_.block_frames, hw = cfg_.height * cfg_.width, F = max_frames_;
  const int64_t prefix = cfg_.prefix_blocks * b;
  const bool noised = cfg_.addnoise_condition > 0.0 && prefix > 0;
  if (noised && !condition_noise_set_)
    throw std::logic_error("rollout core: addnoise_condition > 0 with a prefix needs set_condition_noise first");
  const size_t f32 = sizeof(float), row = static_cast<size_t>(b * hw) * f32, pitch = static_cast<size_t>(F * hw) * f32;
  for (int64_t ctx = 0; ctx < cfg_.contexts; ++ctx)
    for (int64_t blk = 0; blk < cfg_.horizon_blocks; ++blk) {
      float* dst = static_cast<float*>(latents_in_.ptr) + (ctx * C * F + blk * b) * hw;
      check(copy_rows(dst, pitch, slots_[static_cast<size_t>(blk)].latents.ptr, row, row, C, cfg_.device, cfg_.stream),
            "pack_window");
    }
  if (noised)  // every context's prefix frames: x (1 - 0.001 a) + noise 0.001 a
    check(SKYRT_RUN(cfg_, addnoise_prefix, static_cast<float*>(latents_in_.ptr),
                    static_cast<const float*>(condition_noise_.ptr), cfg_.contexts * C, F, prefix, hw, C,
                    0.001 * cfg_.addnoise_condition),
          "addnoise_prefix");
  window_t_.assign(static_cast<size_t>(F), 0.0f);
  for (int64_t blk = 0; blk < cfg_.horizon_blocks; ++blk) {
    float t = static_cast<float>(schedule_.timestep_of_index(schedule_.index_of(blk)));  // 999, step, or 0 (done)
    if (pinned(blk)) t = 0.0f;
    if (noised && blk < cfg_.prefix_blocks) t = static_cast<float>(cfg_.addnoise_condition);
    std::fill_n(window_t_.begin() + blk * b, b, t);
  }
  frames_ = F;
  return F;
}

void RolloutCore::read_window(float* out) const {
  require_recompute("read_window");
  copy_window_blocks(false);
  check(copy_bytes(out, Device{}, window_.ptr, cfg_.device, window_.nbytes(), cfg_.stream), "read_window");
}

std::vector<std::string> RolloutCore::buffer_names() const {
  return {"latents_in", "velocity", "new_k", "new_v", "cache_k", "cache_v"};
}

Buffer RolloutCore::buffer(const std::string& name, int64_t frames) const {
  if (frames < 0 || frames > max_frames_)
    throw std::out_of_range("rollout core: " + std::to_string(frames) + " frames, the buffers hold at most " +
                            std::to_string(max_frames_));
  const int64_t B = cfg_.contexts, C = cfg_.channels;
  const int64_t tokens = (cfg_.recompute ? 0 : frames) * cfg_.tokens_per_frame;  // window mode keeps no K/V
  // Host memory keeps its owner (a numpy view then outlives close()); device views never own.
  auto shared = [&](const Buffer& b) { return cfg_.device.cuda ? b.view() : b; };
  if (name == "latents_in") return shared(latents_in_).slice(0, {B, C, frames, cfg_.height, cfg_.width});
  if (name == "velocity") return shared(velocity_).slice(0, {B, C, frames, cfg_.height, cfg_.width});
  if (name == "new_k") return shared(new_k_).slice(0, {cfg_.layers, B, tokens, cfg_.heads, cfg_.head_dim});
  if (name == "new_v") return shared(new_v_).slice(0, {cfg_.layers, B, tokens, cfg_.heads, cfg_.head_dim});
  if (name == "cache_k") return shared(cache_k_);
  if (name == "cache_v") return shared(cache_v_);
  throw std::invalid_argument("rollout core: no buffer '" + name + "' (latents_in, velocity, new_k, new_v, cache_k, cache_v)");
}

#undef SKYRT_RUN

}  // namespace skyrt

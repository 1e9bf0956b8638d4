// rollout.h — the rollout core: one stream's state in the memory of ONE device.
//
// It owns, allocated once when the stream is configured and never during a step:
//   * the DF schedule (DFSchedule, streamed row by row),
//   * the latents of the blocks in flight [W slots][C, b, h, w] and their per-frame sampler history,
//   * the ring KV cache (KVRing bookkeeping; K and V [layers, B, slots * tokens, heads, head_dim],
//     B = prompt contexts: 1, or 2 with classifier-free guidance, the layout a batch-B DiT step reads),
//   * the committed inputs of the ring's blocks [slots][C, b, h, w] (for a recache under a new prompt),
//   * the DiT step's I/O: latents_in [B, C, F, h, w], velocity [B, C, F, h, w], new_k / new_v
//     [layers, B, F * tokens_per_frame, heads, head_dim], sized for the most frames in flight.
// On host memory every operation runs the CPU references; on a CUDA device the CUDA kernels, with
// the same calls in the same order (the dispatch is one `device.cuda ?` per operation), so CPU CI
// runs the very host logic a GPU runs. Python drives it once per schedule row (and once per block
// commit); a backend only runs the DiT step on the buffers handed out here.
//
// One row, as runtime/kvcache.py drives it:
//   plan = next_row(); start_block(b, noise) for b in plan.started; F = pack_active();
//   <backend: velocity[, new_k, new_v] = DiT(latents_in[:, :, :F], ...)>;
//   set_step_noise(b, noise) for b in plan.step_noise; apply_velocity();
//   for b in plan.finished: finish_block(b); pack_store(next_slot()); <DiT at commit_timestep>;
//                           commit(b, commit_timestep); read_store(slot) -> the clean block.
//
// Window mode (recompute = true): the official SkyReels-V2 window, the cache recomputed per window.
// One finite window of horizon_blocks blocks, all in flight at once (max_blocks_in_flight =
// horizon_blocks); the first prefix_blocks are clean conditioning, the last end_blocks are pinned
// clean (end-image) blocks that never move. Each row the DiT sees EVERY frame of the window, in order,
// with no cached context: prefix and finished frames at t = 0 (prefix frames at t = a with
// 0.1%·a noise when addnoise_condition a > 0), frames not started yet at t = 999 (their noise), active
// frames at their DF timestep. The per-block samplers and CFG are kvcache mode's. One window:
//   load_window(z0); while (next_row(&plan)) { [set_condition_noise(n)]; F = pack_window();
//   <backend: velocity = DiT(latents_in[:, :, :F], window_timesteps())>; apply_velocity(); }
//   read_window(out).
// No ring and no K/V buffers are allocated (new_k, new_v, cache_k, cache_v hold zero tokens).
//
// Samplers: a BlockSampler kind steps one block's latents in place from the (guided) velocity,
// keeping its own block-shaped history buffers. Three kinds: "unipc" (the official
// FlowUniPCMultistepScheduler, order 2, with the official DF aliasing), "euler", and "fewstep" (the
// causal Wan family: x0 = x - σ v, re-noised to the next step's σ' from fresh noise, x0 after the
// last step). A sampler that needs fresh noise for a step says so (needs_step_noise(k)); the row's
// plan then lists the block in `step_noise` and the driver hands the draw over with set_step_noise
// before apply_velocity. The commit pass runs at `commit_timestep` (0, or the family's context_noise).
//
// Noise draw order (the driver's, one source for every mode; runtime/kvcache.py NoiseSource): per
// row, the initial noise of each block in `started` (block order), then after the DiT step one draw
// for each block in `step_noise` (block order). With one block in flight that is the causal family's
// own order: a block's initial noise, then one re-noise draw after every step but its last.
//
// Cache policies: the ring (sink blocks kept, a rolling window; rebase keeps RoPE positions in the
// table) for every mode, and on a prompt switch either the kvcache mode's re-commit of every cached
// block (driven from Python: pack_store / write_kv per slot) or LongLive's recache (longlive_recache:
// pack_recache plans and packs one chunk of committed inputs, one full-attention clean pass over it,
// write_recache puts the new K/V of the chunk's blocks still in the ring back; see pack_recache).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "buffer.h"
#include "df_schedule.h"
#include "kv_cache.h"
#include "samplers.h"

namespace skyrt {

struct RolloutState;  // rollout_state.h

struct RolloutConfig {
  std::vector<int64_t> step_template;  // [S] timesteps
  std::vector<double> sigmas;          // [S + 1] the sampler's float32 sigmas (last 0), as doubles
  std::string sampler = "unipc";       // "unipc", "euler" or "fewstep"
  // [S] the timesteps the DiT sees at each step when they are not integers (a warped few-step list);
  // empty: step_template's.
  std::vector<double> step_timesteps;
  // "fewstep": [S] the σ' a block is re-noised to before step k (entry 0 unused); sigmas[k] is the σ of
  // step k's x0 conversion (their two look-ups, in float64 and float32, may differ).
  std::vector<double> renoise_sigmas;
  double commit_timestep = 0.0;   // the clean pass that commits a block (the causal family's context_noise)
  bool longlive_recache = false;  // buffers for LongLive's recache chunk (sink + window + 1 blocks)
  bool official_df_aliasing = true;    // unipc only (see samplers.h)
  int64_t ar_step = 0, block_frames = 1, prefix_blocks = 0, max_blocks_in_flight = 1, horizon_blocks = -1;
  int64_t sink_blocks = 1, window_blocks = 8;
  int64_t channels = 16, height = 1, width = 1, tokens_per_frame = 1;  // latent size; DiT tokens per frame
  int64_t layers = 1, heads = 1, head_dim = 2, contexts = 1;
  DType kv_dtype = kFloat32;
  float guidance_scale = 1.0f;
  double rope_theta = 10000.0;
  Device device;
  void* stream = nullptr;  // cudaStream_t on a GPU (0 = the default stream)
  // Window mode (see above): every frame of the window recomputed each row; no ring.
  bool recompute = false;
  int64_t end_blocks = 0;            // recompute: pinned clean blocks at the end of the window
  double addnoise_condition = 0.0;   // recompute: a in [0, 1000), the prefix frames' timestep and noise
};

// kOk, or kInvalidArgument with a reason that names the setting and a fix.
int rollout_check(const RolloutConfig& cfg, std::string* why);

struct RowPlan {
  int64_t row = 0;
  std::vector<int64_t> active;     // blocks run through the DiT this row (started, not done), in order
  std::vector<double> timesteps;   // [active] the timestep each active block is seen at
  std::vector<uint8_t> update;     // [active] 1 = its sampler steps after this row
  std::vector<int64_t> started;    // active blocks new this row: start_block(b, noise) each, in order
  std::vector<int64_t> step_noise;  // updated blocks whose step takes fresh noise: set_step_noise(b, noise) each
  std::vector<int64_t> finished;   // blocks whose last update is this row
};

// LongLive's recache chunk before the next block j (see RolloutCore::pack_recache).
struct RecachePlan {
  std::vector<int64_t> blocks;      // the chunk's blocks, in order (empty: nothing to recache)
  std::vector<uint8_t> slot_valid;  // [slots] ring slots the chunk attends to besides itself (the kept sink)
  int64_t position = 0;             // RoPE position of the chunk's first frame
  int64_t frames = 0;               // latent frames of the chunk (one full-attention block)
};

// Block-shaped buffers of one block in flight.
struct BlockState {
  int64_t block = -1;  // -1: the slot is free
  int64_t steps = 0;   // sampler steps taken
  Buffer latents;      // [C, b, h, w]
  std::vector<Buffer> history;
  Buffer step_noise;         // [C, b, h, w] for samplers that need fresh noise per step
  bool noise_ready = false;  // set_step_noise ran for the coming step
};

class BlockSampler {
 public:
  virtual ~BlockSampler() = default;
  virtual int history_buffers() const = 0;
  virtual bool needs_step_noise(int64_t /*k*/) const { return false; }  // step k takes fresh noise
  // x [C, b, hw] in place from v [C, b, hw] at step k (0-based) of the schedule; noise [C, b, hw] when
  // needs_step_noise(k), else nullptr.
  virtual int step(BlockState& state, const float* v, const float* noise, int64_t k) = 0;
};

class RolloutCore {
 public:
  explicit RolloutCore(RolloutConfig cfg);  // cfg must pass rollout_check; allocates everything
  ~RolloutCore() = default;

  bool next_row(RowPlan* plan);                          // false once a finite horizon is done
  void start_block(int64_t block, const float* noise);  // host noise [C, b, h, w]
  int64_t pack_active();                                 // -> F frames packed into latents_in
  void apply_velocity();                                 // CFG combine, then each updated block's sampler
  void set_step_noise(int64_t block, const float* noise);  // host [C, b, h, w], blocks of plan.step_noise

  int64_t next_slot() const;  // the ring slot the next committed block goes to
  void finish_block(int64_t block);  // its clean latents -> committed-input store [next_slot()]
  // A prefix block's commit input (host [C, b, h, w]), optionally x * (1 - factor) + noise * factor.
  void load_commit_input(const float* x, const float* noise, double factor);
  void pack_store(int64_t slot);  // latents_in (every context) <- the committed input of `slot`
  int64_t commit(int64_t block, double t_commit);  // ring append + write_kv; returns the slot
  // new_k/new_v of block `index` of the last step's frames -> ring slot, every context.
  void write_kv(int64_t slot, int64_t index = 0);
  // LongLive's recache (longlive_recache; their _recache_after_switch, global sink), before block j =
  // the blocks committed so far: one clean pass, full attention, over the last L = sink + window + 1
  // blocks at their own positions. j <= L: every finished block, attending only to each other (the
  // sink rewritten too); j > L: blocks j - window - 1 .. j - 1 (their chunk minus its first `sink`
  // blocks, which their code neither attends to nor writes), attending to each other and to the sink's
  // K/V as it is. Packs the chunk's committed inputs into latents_in (the oldest may have left the
  // ring: its input is kept aside when its slot is reused) and returns the plan; after the driver's
  // DiT step, write_recache writes the new K/V of the chunk's blocks still in the ring.
  RecachePlan pack_recache();
  void write_recache();
  void rebase(int64_t shift);   // ring origin += shift; cached keys rotated by -shift (temporal RoPE)
  void read_store(int64_t slot, float* out) const;  // host [C, b, h, w]
  double committed_timestep(int64_t slot) const { return slot_t_.at(static_cast<size_t>(slot)); }
  int64_t committed_block(int64_t slot) const { return slot_block_.at(static_cast<size_t>(slot)); }

  // ---- window mode (cfg.recompute) ----
  void load_window(const float* z);              // host [C, F, h, w], F = window_frames(): every block
  void set_condition_noise(const float* noise);  // host [C, prefix_blocks * b, h, w], kept until replaced
  int64_t pack_window();                         // every frame -> latents_in (prefix noised); returns F
  const std::vector<float>& window_timesteps() const { return window_t_; }  // [F] of the last pack
  void read_window(float* out) const;            // host [C, F, h, w]
  int64_t window_frames() const { return cfg_.recompute ? cfg_.horizon_blocks * cfg_.block_frames : 0; }

  const RolloutConfig& config() const { return cfg_; }
  const KVRing& ring() const { return ring_; }
  const DFSchedule& schedule() const { return schedule_; }
  int64_t frames() const { return frames_; }  // frames of the last pack
  int64_t max_frames() const { return max_frames_; }
  int64_t in_flight() const;
  int64_t steps_taken(int64_t block) const;  // sampler steps block `block` (in flight) has taken
  // The DiT step's buffers: names latents_in, velocity, new_k, new_v (shaped for `frames` frames),
  // cache_k, cache_v (whole ring). A non-owning view.
  Buffer buffer(const std::string& name, int64_t frames) const;
  std::vector<std::string> buffer_names() const;

  // The whole stream state between rows as named host arrays, and back (rollout_state.h).
  RolloutState export_state() const;
  int import_state(const RolloutState& state, std::string* why);

 private:
  BlockState& state_of(int64_t block);
  int64_t block_elems() const { return cfg_.channels * cfg_.block_frames * cfg_.height * cfg_.width; }
  int64_t kv_block_elems() const {
    return cfg_.block_frames * cfg_.tokens_per_frame * cfg_.heads * cfg_.head_dim;
  }
  void check(int status, const char* what) const;
  void require_recompute(const char* what) const;
  bool pinned(int64_t block) const { return cfg_.recompute && block >= cfg_.horizon_blocks - cfg_.end_blocks; }
  void copy_window_blocks(bool into_slots) const;  // window_ <-> the blocks' latents

  RolloutConfig cfg_;
  DFSchedule schedule_;
  KVRing ring_;
  std::unique_ptr<BlockSampler> sampler_;
  int64_t max_frames_ = 0, frames_ = 0;
  std::vector<BlockState> slots_;  // [max_blocks_in_flight], block b in slot b % W
  std::vector<int64_t> active_, active_update_;
  Buffer latents_in_, velocity_, new_k_, new_v_, cache_k_, cache_v_, store_, scratch_;
  Buffer window_, condition_noise_;  // recompute: [C, F, h, w] staging, [C, prefix frames, h, w]
  bool condition_noise_set_ = false;
  std::vector<float> window_t_;
  std::vector<double> slot_t_;
  std::vector<int64_t> slot_block_;
  Buffer evicted_;  // longlive_recache: the committed input of the block whose slot was reused last
  int64_t evicted_block_ = -1;
  RecachePlan recache_;
  void keep_evicted_input(int64_t slot);
  const float* committed_input(int64_t block) const;
};

std::unique_ptr<BlockSampler> make_block_sampler(const RolloutConfig& cfg);

}  // namespace skyrt

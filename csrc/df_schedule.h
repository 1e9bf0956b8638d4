// df_schedule.h — the diffusion-forcing (DF) schedule as an unbounded stream of steps.
//
// Row for row it is the official `generate_timestep_matrix` (SkyReels-V2
// pipelines/diffusion_forcing_pipeline.py; ported line for line in diffusers'
// SkyReelsV2DiffusionForcingPipeline), computed per block and one row at a time so it can run
// forever in O(blocks in flight) memory:
//   * rows index the extended template [999, t_0 .. t_{S-1}, 0]: index 0 = not started,
//     1..S = the S denoising steps, S+1 = done; prefix blocks start at S+1;
//   * block 0 (or the block after a finished one) advances by one index per row, every other block
//     trails its predecessor by `ar_step` indices (ar_step 0 = all blocks in sync); clamp [0, S+1];
//   * update = index changed and is not S+1;
//   * the active range is the official valid_interval: a terminal flag that starts at
//     W = max_blocks_in_flight and moves one block on whenever the block at the flag is updated;
//     range = [max(flag - W, 0), flag).
// With a horizon of H blocks the stream stops after the row in which every block made its last
// update (exactly where the official while-loop stops) and `df_timestep_matrix` expands those rows
// to frames: it equals generate_timestep_matrix(num_frames, step_template, base_num_frames, ar_step,
// num_pre_ready, causal_block_size) element for element. Without a horizon the stream never ends.
// Settings the public code mishandles silently are refused by `df_schedule_check`.
#pragma once
#include <cstdint>
#include <deque>
#include <string>
#include <vector>
#include "common.h"

namespace skyrt {

struct DFScheduleConfig {
  std::vector<int64_t> step_template;  // [S] timesteps of the S denoising steps, e.g. [999, 995, ...]
  int64_t ar_step = 0;                 // index lag between consecutive blocks; 0 = synchronous
  int64_t causal_block_size = 1;       // latent frames per block
  int64_t num_prefix_blocks = 0;       // blocks ready (clean) before the first row
  int64_t max_blocks_in_flight = 0;    // W, the window (official base_num_frames / block size); 0 = H
  int64_t horizon_blocks = -1;         // H, blocks to generate including the prefix; -1 = endless
};

// One row of the schedule, restricted to the active blocks [first, last).
struct DFStep {
  int64_t row = 0;                // 0-based row number
  int64_t first = 0, last = 0;    // active blocks (official valid_interval, clipped to the horizon)
  std::vector<int64_t> index;     // [last - first] row index into [999, template..., 0]
  std::vector<int64_t> timestep;  // [last - first] timestep the model sees for each active block
  std::vector<uint8_t> update;    // [last - first] 1 = the sampler steps this block in this row
  std::vector<int64_t> finished;  // absolute ids of blocks whose last update is in this row
};

// kOk, or kInvalidArgument with a reason in *why.
int df_schedule_check(const DFScheduleConfig& cfg, std::string* why);

// Where an unbounded schedule stands between rows (rollout_state.h saves and restores it).
struct DFScheduleState {
  int64_t live_begin = 0, terminal = 0, row = 0;
  std::vector<int64_t> live;  // template index of blocks live_begin .. live_begin + live.size() - 1
};

class DFSchedule {
 public:
  explicit DFSchedule(DFScheduleConfig cfg);  // cfg must pass df_schedule_check

  bool next(DFStep* step);  // false once a finite horizon is done (step untouched)
  bool done() const;
  void reset();
  int64_t index_of(int64_t block) const;  // template index of `block` in the last row yielded
  int64_t timestep_of_index(int64_t index) const;  // [999, template..., 0][index]
  int64_t rows() const { return row_; }
  int64_t num_steps() const { return static_cast<int64_t>(cfg_.step_template.size()); }
  int64_t window() const { return window_; }
  int64_t terminal_flag() const { return terminal_; }  // official terminal_flag (unclipped)
  const DFScheduleConfig& config() const { return cfg_; }
  DFScheduleState state() const { return {live_begin_, terminal_, row_, {live_.begin(), live_.end()}}; }
  // kOk, or kInvalidArgument with a reason when `s` is no state this schedule can be in.
  int set_state(const DFScheduleState& s, std::string* why);

 private:
  int64_t horizon() const;                    // H, or INT64_MAX when endless
  std::vector<int64_t> advance_live() const;  // the next row for blocks live_begin_ ...
  void fill_step(const std::vector<int64_t>& next_live, DFStep* step) const;

  DFScheduleConfig cfg_;
  int64_t window_ = 0;
  // Blocks < live_begin_ are at index S+1; blocks in [live_begin_, live_begin_ + live_.size())
  // hold live_; later blocks are at 0 (not started).
  int64_t live_begin_ = 0;
  std::deque<int64_t> live_;
  int64_t terminal_ = 0;
  int64_t row_ = 0;
};

// The finite schedule in frames, laid out like generate_timestep_matrix's outputs.
struct DFMatrix {
  int64_t rows = 0, frames = 0;
  std::vector<int64_t> step_matrix;     // [rows, frames] timesteps
  std::vector<int64_t> step_index;      // [rows, frames] template indices
  std::vector<uint8_t> update_mask;     // [rows, frames]
  std::vector<int64_t> valid_interval;  // [rows, 2] (start, end) in frames, unclipped as official
};

// Arguments as the official function; frame counts must be multiples of causal_block_size.
int df_timestep_matrix(int64_t num_frames, const std::vector<int64_t>& step_template,
                       int64_t base_num_frames, int64_t ar_step, int64_t num_pre_ready,
                       int64_t causal_block_size, DFMatrix* out, std::string* why);

}  // namespace skyrt

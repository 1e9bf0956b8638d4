// df_schedule.cpp — the streaming diffusion-forcing schedule (see df_schedule.h).
#include "df_schedule.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace skyrt {

namespace {

bool fail(std::string* why, const std::string& message) {
  if (why != nullptr) *why = message;
  return false;
}

bool check_counts(const DFScheduleConfig& c, std::string* why) {
  if (c.step_template.empty()) return fail(why, "step_template must hold at least one timestep");
  if (c.ar_step < 0) return fail(why, "ar_step must be >= 0 (0 = synchronous)");
  if (c.causal_block_size < 1) return fail(why, "causal_block_size must be >= 1");
  if (c.num_prefix_blocks < 0) return fail(why, "num_prefix_blocks must be >= 0");
  if (c.horizon_blocks < -1) return fail(why, "horizon_blocks must be >= 0, or -1 for an endless stream");
  if (c.max_blocks_in_flight < 0) return fail(why, "max_blocks_in_flight must be >= 0 (0 = the horizon)");
  if (c.max_blocks_in_flight == 0 && c.horizon_blocks < 0)
    return fail(why, "an endless stream needs max_blocks_in_flight >= 1");
  return true;
}

// Mirrors the official assertion (ar_step >= S / W when the window is shorter than the video) and
// refuses a prefix longer than the window: the official window would never reach the first block
// to denoise and those frames would silently stay noise.
bool check_window(const DFScheduleConfig& c, int64_t window, std::string* why) {
  const bool bounded = c.horizon_blocks >= 0 && c.horizon_blocks <= window;
  if (bounded) return true;
  const int64_t steps = static_cast<int64_t>(c.step_template.size());
  const int64_t need = (steps + window - 1) / window;  // ar_step >= S / W, without overflow
  if (c.ar_step < need) {
    return fail(why, "ar_step must be at least " + std::to_string(need) + " when the video is longer than " +
                         std::to_string(window) + " blocks in flight (num_steps " + std::to_string(steps) +
                         " / max_blocks_in_flight); ar_step 0 (synchronous) needs a horizon that fits the window");
  }
  if (c.num_prefix_blocks > window)
    return fail(why, "num_prefix_blocks (" + std::to_string(c.num_prefix_blocks) +
                         ") must not exceed max_blocks_in_flight (" + std::to_string(window) + ")");
  return true;
}

}  // namespace

int df_schedule_check(const DFScheduleConfig& cfg, std::string* why) {
  if (!check_counts(cfg, why)) return kInvalidArgument;
  const int64_t window = cfg.max_blocks_in_flight > 0 ? cfg.max_blocks_in_flight : cfg.horizon_blocks;
  if (!check_window(cfg, window, why)) return kInvalidArgument;
  return kOk;
}

DFSchedule::DFSchedule(DFScheduleConfig cfg) : cfg_(std::move(cfg)) {
  window_ = cfg_.max_blocks_in_flight > 0 ? cfg_.max_blocks_in_flight : cfg_.horizon_blocks;
  reset();
}

void DFSchedule::reset() {
  live_begin_ = cfg_.num_prefix_blocks;
  live_.clear();
  terminal_ = window_;
  row_ = 0;
}

int64_t DFSchedule::horizon() const {
  return cfg_.horizon_blocks >= 0 ? cfg_.horizon_blocks : std::numeric_limits<int64_t>::max();
}

int64_t DFSchedule::timestep_of_index(int64_t index) const {
  const int64_t steps = num_steps();
  if (index <= 0) return 999;       // not started: pure noise, as the official template's head
  if (index > steps) return 0;      // done
  return cfg_.step_template[static_cast<size_t>(index - 1)];
}

int64_t DFSchedule::index_of(int64_t block) const {
  if (block < live_begin_) return num_steps() + 1;
  const int64_t k = block - live_begin_;
  return k < static_cast<int64_t>(live_.size()) ? live_[static_cast<size_t>(k)] : 0;
}

bool DFSchedule::done() const {
  if (cfg_.horizon_blocks < 0) return false;
  const int64_t steps = num_steps();
  if (live_begin_ + static_cast<int64_t>(live_.size()) < cfg_.horizon_blocks) return false;
  for (int64_t v : live_)
    if (v < steps) return false;
  return true;
}

// One official row for blocks live_begin_ onwards; stops at the horizon or at the first block that
// stays unstarted (every later block then stays unstarted too).
std::vector<int64_t> DFSchedule::advance_live() const {
  const int64_t steps = num_steps(), done_index = steps + 1, h = horizon();
  const int64_t live_end = live_begin_ + static_cast<int64_t>(live_.size());
  std::vector<int64_t> next;
  next.reserve(live_.size() + 1);
  int64_t prev_pre = done_index, prev_next = done_index;  // block live_begin_-1 is done (or absent)
  for (int64_t b = live_begin_; b < h; ++b) {
    const int64_t pre = index_of(b);
    int64_t v = (b == 0 || prev_pre >= steps) ? pre + 1 : prev_next - cfg_.ar_step;
    v = std::min(std::max(v, int64_t{0}), done_index);
    if (b >= live_end && v == 0) break;
    next.push_back(v);
    prev_pre = pre;
    prev_next = v;
  }
  return next;
}

void DFSchedule::fill_step(const std::vector<int64_t>& next_live, DFStep* step) const {
  const int64_t steps = num_steps(), done_index = steps + 1;
  auto next_of = [&](int64_t b) -> int64_t {
    if (b < live_begin_) return done_index;
    const int64_t k = b - live_begin_;
    return k < static_cast<int64_t>(next_live.size()) ? next_live[static_cast<size_t>(k)] : 0;
  };
  step->row = row_;
  step->first = std::max(terminal_ - window_, int64_t{0});
  step->last = std::min(terminal_, horizon());
  if (step->last < step->first) step->last = step->first;
  const size_t n = static_cast<size_t>(step->last - step->first);
  step->index.assign(n, 0);
  step->timestep.assign(n, 0);
  step->update.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = step->first + static_cast<int64_t>(i);
    const int64_t v = next_of(b);
    step->index[i] = v;
    step->timestep[i] = timestep_of_index(v);
    step->update[i] = (v != index_of(b) && v != done_index) ? 1 : 0;
  }
  step->finished.clear();
  for (size_t k = 0; k < next_live.size(); ++k) {
    const int64_t b = live_begin_ + static_cast<int64_t>(k);
    if (next_live[k] == steps && index_of(b) != steps) step->finished.push_back(b);
  }
}

bool DFSchedule::next(DFStep* step) {
  if (done()) return false;
  const int64_t done_index = num_steps() + 1;
  std::vector<int64_t> next_live = advance_live();
  // Official valid_interval: the flag moves on when the block at the flag is updated in this row.
  if (terminal_ < horizon() && terminal_ >= live_begin_) {
    const int64_t k = terminal_ - live_begin_;
    const int64_t v = k < static_cast<int64_t>(next_live.size()) ? next_live[static_cast<size_t>(k)] : 0;
    if (v != index_of(terminal_) && v != done_index) ++terminal_;
  }
  fill_step(next_live, step);
  live_.assign(next_live.begin(), next_live.end());
  while (!live_.empty() && live_.front() == done_index) {
    live_.pop_front();
    ++live_begin_;
  }
  ++row_;
  return true;
}

namespace {

bool blocks_of(int64_t frames, int64_t block_size, const char* name, int64_t* blocks, std::string* why) {
  if (frames < 0 || frames % block_size != 0)
    return fail(why, std::string(name) + " (" + std::to_string(frames) + ") must be a non-negative multiple of " +
                         "causal_block_size (" + std::to_string(block_size) + "); the public pipelines would " +
                         "silently leave the remainder as noise");
  *blocks = frames / block_size;
  return true;
}

void append_row(const DFSchedule& sched, const DFStep& step, int64_t horizon, int64_t block_size, DFMatrix* m) {
  for (int64_t b = 0; b < horizon; ++b) {
    const int64_t v = sched.index_of(b);
    const bool active = b >= step.first && b < step.last;
    const uint8_t upd = active ? step.update[static_cast<size_t>(b - step.first)] : 0;
    const int64_t t = sched.timestep_of_index(v);
    for (int64_t f = 0; f < block_size; ++f) {
      m->step_index.push_back(v);
      m->step_matrix.push_back(t);
      m->update_mask.push_back(upd);
    }
  }
  // The official interval end is the unclipped terminal flag: max(last, W) (see df_schedule.h).
  const int64_t end = std::max(step.last, sched.window());
  m->valid_interval.push_back(step.first * block_size);
  m->valid_interval.push_back(end * block_size);
  ++m->rows;
}

}  // namespace

int df_timestep_matrix(int64_t num_frames, const std::vector<int64_t>& step_template, int64_t base_num_frames,
                       int64_t ar_step, int64_t num_pre_ready, int64_t causal_block_size, DFMatrix* out,
                       std::string* why) {
  if (causal_block_size < 1) return fail(why, "causal_block_size must be >= 1"), kInvalidArgument;
  DFScheduleConfig cfg;
  cfg.step_template = step_template;
  cfg.ar_step = ar_step;
  cfg.causal_block_size = causal_block_size;
  if (!blocks_of(num_frames, causal_block_size, "num_frames", &cfg.horizon_blocks, why) ||
      !blocks_of(base_num_frames, causal_block_size, "base_num_frames", &cfg.max_blocks_in_flight, why) ||
      !blocks_of(num_pre_ready, causal_block_size, "num_pre_ready", &cfg.num_prefix_blocks, why))
    return kInvalidArgument;
  if (cfg.max_blocks_in_flight == 0) return fail(why, "base_num_frames must be >= causal_block_size"), kInvalidArgument;
  if (int status = df_schedule_check(cfg, why); status != kOk) return status;
  DFSchedule sched(cfg);
  *out = DFMatrix{};
  out->frames = num_frames;
  DFStep step;
  while (sched.next(&step)) append_row(sched, step, cfg.horizon_blocks, causal_block_size, out);
  return kOk;
}

}  // namespace skyrt

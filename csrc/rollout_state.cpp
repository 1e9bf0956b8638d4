// rollout_state.cpp — RolloutCore::export_state / import_state (rollout_state.h), and the schedule's
// and ring's state setters they use. Every array goes through host memory with copy_bytes, so the same
// code saves a core on a GPU; the checks run before the first write, so a refused import changes nothing.
#include "rollout_state.h"

#include <cstring>
#include <stdexcept>

#include "buffer.h"

namespace skyrt {

namespace {

void copied(int status, const char* what) {
  if (status != kOk) throw std::runtime_error(std::string("rollout core: ") + what + ": " + status_message(status));
}

size_t dtype_bytes(const std::string& dtype) {
  if (dtype == "float64" || dtype == "int64") return 8;
  if (dtype == "float32") return 4;
  if (dtype == "float16") return 2;
  return 0;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

template <typename T>
StateArray host_array(std::string name, const char* dtype, const std::vector<T>& values) {
  StateArray a{std::move(name), dtype, {static_cast<int64_t>(values.size())}, {}};
  a.bytes.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(a.bytes.data(), values.data(), a.bytes.size());
  return a;
}

template <typename T>
std::vector<T> values_of(const StateArray& a) {
  std::vector<T> out(a.bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), a.bytes.data(), out.size() * sizeof(T));
  return out;
}

// `count` device buffers of equal shape, stacked into one host array [count, *shape].
StateArray stacked(std::string name, const std::vector<const Buffer*>& parts, const std::vector<int64_t>& shape,
                   DType dtype, void* stream) {
  StateArray a{std::move(name), dtype_name(dtype), {static_cast<int64_t>(parts.size())}, {}};
  a.shape.insert(a.shape.end(), shape.begin(), shape.end());
  size_t each = dtype_size(dtype);
  for (int64_t d : shape) each *= static_cast<size_t>(d);
  a.bytes.resize(each * parts.size());
  for (size_t i = 0; i < parts.size(); ++i)
    if (each) copied(copy_bytes(a.bytes.data() + i * each, Device{}, parts[i]->ptr, parts[i]->device, each, stream),
                           "export_state");
  return a;
}

StateArray of_buffer(std::string name, const Buffer& b, void* stream) {
  StateArray a{std::move(name), dtype_name(b.dtype), b.shape, std::vector<uint8_t>(b.nbytes())};
  if (b.nbytes()) copied(copy_bytes(a.bytes.data(), Device{}, b.ptr, b.device, b.nbytes(), stream), "export_state");
  return a;
}

// The settings a state only fits a core of: integers and floats, with names for the refusal.
struct ConfigFields {
  std::vector<std::pair<const char*, int64_t>> ints;
  std::vector<std::pair<std::string, double>> floats;
};

ConfigFields config_fields(const RolloutConfig& c, int64_t history_buffers) {
  ConfigFields f;
  const int64_t sampler = c.sampler == "unipc" ? 0 : c.sampler == "euler" ? 1 : 2;
  f.ints = {{"ar_step", c.ar_step}, {"causal_block_size", c.block_frames}, {"prefix_blocks", c.prefix_blocks},
            {"max_blocks_in_flight", c.max_blocks_in_flight}, {"horizon_blocks", c.horizon_blocks},
            {"sink_blocks", c.sink_blocks}, {"window_blocks", c.window_blocks}, {"channels", c.channels},
            {"height", c.height}, {"width", c.width}, {"tokens_per_frame", c.tokens_per_frame}, {"layers", c.layers},
            {"heads", c.heads}, {"head_dim", c.head_dim}, {"contexts", c.contexts},
            {"kv_dtype", static_cast<int64_t>(c.kv_dtype)}, {"sampler", sampler},
            {"official_df_aliasing", c.official_df_aliasing}, {"longlive_recache", c.longlive_recache},
            {"recompute", c.recompute}, {"end_blocks", c.end_blocks},
            {"steps", static_cast<int64_t>(c.step_template.size())}, {"history_buffers", history_buffers}};
  f.floats = {{"guidance_scale", c.guidance_scale}, {"rope_theta", c.rope_theta},
              {"commit_timestep", c.commit_timestep}, {"addnoise_condition", c.addnoise_condition}};
  auto add = [&f](const char* what, const auto& values) {
    for (size_t i = 0; i < values.size(); ++i)
      f.floats.emplace_back(std::string(what) + "[" + std::to_string(i) + "]", static_cast<double>(values[i]));
  };
  add("step_template", c.step_template);
  add("sigmas", c.sigmas);
  add("step_timesteps", c.step_timesteps);
  add("renoise_sigmas", c.renoise_sigmas);
  return f;
}

int refuse(std::string* why, const std::string& reason) {
  if (why) *why = reason;
  return kInvalidArgument;
}

}  // namespace

int64_t StateArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const StateArray* RolloutState::find(const std::string& name) const {
  for (const StateArray& a : arrays)
    if (a.name == name) return &a;
  return nullptr;
}

int DFSchedule::set_state(const DFScheduleState& s, std::string* why) {
  const int64_t last_index = num_steps() + 1;
  if (s.row < 0 || s.live_begin < cfg_.num_prefix_blocks || s.terminal < window_)
    return refuse(why, "schedule position out of range (row " + std::to_string(s.row) + ", first live block " +
                           std::to_string(s.live_begin) + ", terminal flag " + std::to_string(s.terminal) + ")");
  for (int64_t index : s.live)
    if (index < 0 || index > last_index)
      return refuse(why, "schedule index " + std::to_string(index) + " outside [0, " + std::to_string(last_index) + "]");
  live_begin_ = s.live_begin;
  live_.assign(s.live.begin(), s.live.end());
  terminal_ = s.terminal;
  row_ = s.row;
  return kOk;
}

int KVRing::set_state(const KVRingState& s, std::string* why) {
  const size_t cap = static_cast<size_t>(capacity());
  if (s.slot_block.size() != cap || s.slot_position.size() != cap)
    return refuse(why, "ring tables of " + std::to_string(s.slot_block.size()) + " slots for a ring of " +
                           std::to_string(cap));
  if (s.appended < 0 || s.last_block < -1)
    return refuse(why, "ring counters out of range (appended " + std::to_string(s.appended) + ")");
  for (int64_t b : s.slot_block)
    if (b < -1 || b > s.last_block) return refuse(why, "ring slot holds block " + std::to_string(b) + " past the last");
  appended_ = s.appended;
  origin_ = s.origin;
  last_block_ = s.last_block;
  slot_block_ = s.slot_block;
  slot_position_ = s.slot_position;
  return kOk;
}

RolloutState RolloutCore::export_state() const {
  RolloutState out;
  auto& a = out.arrays;
  void* s = cfg_.stream;
  const ConfigFields fields = config_fields(cfg_, sampler_->history_buffers());
  std::vector<int64_t> ints{kRolloutStateVersion};
  for (const auto& [name, v] : fields.ints) ints.push_back(v);
  std::vector<double> floats;
  for (const auto& [name, v] : fields.floats) floats.push_back(v);
  a.push_back(host_array("config_int", "int64", ints));
  a.push_back(host_array("config_float", "float64", floats));

  const DFScheduleState sched = schedule_.state();
  a.push_back(host_array("schedule", "int64", std::vector<int64_t>{sched.live_begin, sched.terminal, sched.row}));
  a.push_back(host_array("schedule_live", "int64", sched.live));
  const KVRingState ring = ring_.state();
  a.push_back(host_array("ring", "int64", std::vector<int64_t>{ring.appended, ring.origin, ring.last_block}));
  a.push_back(host_array("ring_slot_block", "int64", ring.slot_block));
  a.push_back(host_array("ring_slot_position", "int64", ring.slot_position));

  a.push_back(host_array("core", "int64", std::vector<int64_t>{frames_, evicted_block_, condition_noise_set_}));
  a.push_back(host_array("store_timestep", "float64", slot_t_));
  a.push_back(host_array("store_block", "int64", slot_block_));
  a.push_back(host_array("active", "int64", active_));
  a.push_back(host_array("active_update", "int64", active_update_));
  a.push_back(host_array("window_timesteps", "float32", window_t_));

  std::vector<int64_t> meta;
  std::vector<const Buffer*> latents, history, noise;
  for (const BlockState& st : slots_) {
    meta.insert(meta.end(), {st.block, st.steps, st.noise_ready});
    latents.push_back(&st.latents);
    for (const Buffer& h : st.history) history.push_back(&h);
    if (st.step_noise.ptr) noise.push_back(&st.step_noise);
  }
  StateArray m = host_array("slots", "int64", meta);
  m.shape = {static_cast<int64_t>(slots_.size()), 3};
  a.push_back(std::move(m));
  const std::vector<int64_t> block{cfg_.channels, cfg_.block_frames, cfg_.height, cfg_.width};
  a.push_back(stacked("slot_latents", latents, block, kFloat32, s));
  a.push_back(stacked("slot_history", history, block, kFloat32, s));
  a.push_back(stacked("slot_step_noise", noise, block, kFloat32, s));

  a.push_back(of_buffer("cache_k", cache_k_, s));
  a.push_back(of_buffer("cache_v", cache_v_, s));
  a.push_back(of_buffer("store", store_, s));
  if (evicted_.ptr) a.push_back(of_buffer("evicted", evicted_, s));
  if (window_.ptr) a.push_back(of_buffer("window", window_, s));
  if (condition_noise_.ptr) a.push_back(of_buffer("condition_noise", condition_noise_, s));
  return out;
}

int RolloutCore::import_state(const RolloutState& state, std::string* why) {
  // ---- everything checked first ----
  auto get = [&](const char* name, const std::string& dtype, const std::vector<int64_t>* shape,
                 const StateArray** out) -> int {
    const StateArray* a = state.find(name);
    if (a == nullptr) return refuse(why, std::string("the state has no '") + name + "' array");
    if (a->dtype != dtype) return refuse(why, std::string("'") + name + "' is " + a->dtype + ", this core's is " + dtype);
    if (dtype_bytes(a->dtype) * static_cast<size_t>(a->numel()) != a->bytes.size() ||
        (a->shape.size() != 1 && shape == nullptr))
      return refuse(why, std::string("'") + name + "' holds " + std::to_string(a->bytes.size()) + " bytes for shape " +
                             shape_str(a->shape));
    if (shape && a->shape != *shape)
      return refuse(why, std::string("'") + name + "' is " + shape_str(a->shape) + ", this core's is " + shape_str(*shape));
    *out = a;
    return kOk;
  };
  const StateArray *cint, *cfloat;
  if (get("config_int", "int64", nullptr, &cint) || get("config_float", "float64", nullptr, &cfloat)) return kInvalidArgument;
  const std::vector<int64_t> ints = values_of<int64_t>(*cint);
  if (ints.empty() || ints[0] != kRolloutStateVersion)
    return refuse(why, "rollout state version " + (ints.empty() ? std::string("?") : std::to_string(ints[0])) +
                           ", this build reads version " + std::to_string(kRolloutStateVersion));
  const ConfigFields fields = config_fields(cfg_, sampler_->history_buffers());
  if (ints.size() != fields.ints.size() + 1) return refuse(why, "the state's configuration has another layout");
  for (size_t i = 0; i < fields.ints.size(); ++i)
    if (ints[i + 1] != fields.ints[i].second)
      return refuse(why, std::string("the state was taken with ") + fields.ints[i].first + " = " +
                             std::to_string(ints[i + 1]) + ", this core has " + std::to_string(fields.ints[i].second));
  const std::vector<double> floats = values_of<double>(*cfloat);
  if (floats.size() != fields.floats.size())
    return refuse(why, "the state's schedule has " + std::to_string(floats.size()) + " float settings, this core's " +
                           std::to_string(fields.floats.size()));
  for (size_t i = 0; i < floats.size(); ++i)
    if (floats[i] != fields.floats[i].second)
      return refuse(why, "the state was taken with " + fields.floats[i].first + " = " + std::to_string(floats[i]) +
                             ", this core has " + std::to_string(fields.floats[i].second));

  const int64_t W = static_cast<int64_t>(slots_.size()), cap = ring_.capacity();
  const std::vector<int64_t> three{3}, cap_shape{cap}, meta_shape{W, 3};
  const StateArray *sched, *live, *ring, *sb, *sp, *core, *st_t, *st_b, *act, *act_u, *win_t, *meta;
  if (get("schedule", "int64", &three, &sched) || get("schedule_live", "int64", nullptr, &live) ||
      get("ring", "int64", &three, &ring) || get("ring_slot_block", "int64", &cap_shape, &sb) ||
      get("ring_slot_position", "int64", &cap_shape, &sp) || get("core", "int64", &three, &core) ||
      get("store_timestep", "float64", &cap_shape, &st_t) || get("store_block", "int64", &cap_shape, &st_b) ||
      get("active", "int64", nullptr, &act) || get("active_update", "int64", nullptr, &act_u) ||
      get("window_timesteps", "float32", nullptr, &win_t) || get("slots", "int64", &meta_shape, &meta))
    return kInvalidArgument;
  if (act->numel() != act_u->numel()) return refuse(why, "'active' and 'active_update' differ in length");
  if (win_t->numel() > max_frames_) return refuse(why, "'window_timesteps' is longer than this core's window");
  const std::vector<int64_t> block{cfg_.channels, cfg_.block_frames, cfg_.height, cfg_.width};
  auto stack_shape = [&](int64_t n) {
    std::vector<int64_t> sh{n};
    sh.insert(sh.end(), block.begin(), block.end());
    return sh;
  };
  const int64_t noised = slots_.empty() || !slots_[0].step_noise.ptr ? 0 : W;
  const std::vector<int64_t> lat_shape = stack_shape(W), hist_shape = stack_shape(W * sampler_->history_buffers()),
                             noise_shape = stack_shape(noised);
  const StateArray *lat, *hist, *noise;
  if (get("slot_latents", "float32", &lat_shape, &lat) || get("slot_history", "float32", &hist_shape, &hist) ||
      get("slot_step_noise", "float32", &noise_shape, &noise))
    return kInvalidArgument;
  struct Dest {
    const char* name;
    const Buffer* buffer;
    const StateArray* array = nullptr;
  };
  std::vector<Dest> dests{{"cache_k", &cache_k_}, {"cache_v", &cache_v_}, {"store", &store_}};
  if (evicted_.ptr) dests.push_back({"evicted", &evicted_});
  if (window_.ptr) dests.push_back({"window", &window_});
  if (condition_noise_.ptr) dests.push_back({"condition_noise", &condition_noise_});
  for (Dest& d : dests)
    if (get(d.name, dtype_name(d.buffer->dtype), &d.buffer->shape, &d.array)) return kInvalidArgument;
  const std::vector<int64_t> meta_v = values_of<int64_t>(*meta);
  for (int64_t i = 0; i < W; ++i) {
    const int64_t blk = meta_v[static_cast<size_t>(3 * i)], steps = meta_v[static_cast<size_t>(3 * i + 1)];
    if (blk < -1 || (blk >= 0 && blk % W != i) || steps < 0 || steps > schedule_.num_steps())
      return refuse(why, "in-flight slot " + std::to_string(i) + " holds block " + std::to_string(blk) + " after " +
                             std::to_string(steps) + " steps, which no stream of this core can");
  }
  const std::vector<int64_t> sched_v = values_of<int64_t>(*sched), ring_v = values_of<int64_t>(*ring);
  const std::vector<int64_t> core_v = values_of<int64_t>(*core);
  DFScheduleState new_sched{sched_v[0], sched_v[1], sched_v[2], values_of<int64_t>(*live)};
  KVRingState new_ring{ring_v[0], ring_v[1], ring_v[2], values_of<int64_t>(*sb), values_of<int64_t>(*sp)};
  if (core_v[0] < 0 || core_v[0] > max_frames_) return refuse(why, "'core' frames out of range");
  // The setters check their own ranges; try them on copies so that a refusal leaves this core alone.
  DFSchedule sched_copy = schedule_;
  KVRing ring_copy = ring_;
  if (sched_copy.set_state(new_sched, why) || ring_copy.set_state(new_ring, why)) return kInvalidArgument;

  // ---- then written ----
  void* s = cfg_.stream;
  schedule_ = sched_copy;
  ring_ = ring_copy;
  frames_ = core_v[0];
  evicted_block_ = core_v[1];
  condition_noise_set_ = core_v[2] != 0;
  slot_t_ = values_of<double>(*st_t);
  slot_block_ = values_of<int64_t>(*st_b);
  active_ = values_of<int64_t>(*act);
  active_update_ = values_of<int64_t>(*act_u);
  window_t_ = values_of<float>(*win_t);
  const size_t each = static_cast<size_t>(block_elems()) * sizeof(float);
  size_t h = 0;
  for (int64_t i = 0; i < W; ++i) {
    BlockState& st = slots_[static_cast<size_t>(i)];
    st.block = meta_v[static_cast<size_t>(3 * i)];
    st.steps = meta_v[static_cast<size_t>(3 * i + 1)];
    st.noise_ready = meta_v[static_cast<size_t>(3 * i + 2)] != 0;
    check(copy_bytes(st.latents.ptr, cfg_.device, lat->bytes.data() + i * each, Device{}, each, s), "import_state");
    for (Buffer& hb : st.history)
      check(copy_bytes(hb.ptr, cfg_.device, hist->bytes.data() + (h++) * each, Device{}, each, s), "import_state");
    if (st.step_noise.ptr)
      check(copy_bytes(st.step_noise.ptr, cfg_.device, noise->bytes.data() + i * each, Device{}, each, s),
            "import_state");
  }
  for (const Dest& d : dests)
    if (d.buffer->nbytes())
      check(copy_bytes(d.buffer->ptr, cfg_.device, d.array->bytes.data(), Device{}, d.buffer->nbytes(), s),
            "import_state");
  check(synchronize(cfg_.device, s), "import_state");
  return kOk;
}

}  // namespace skyrt

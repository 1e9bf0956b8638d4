// module.cpp — the nanobind binding layer of skyrt._core. Only this file sees arrays: it checks
// shapes and dtypes, hands raw pointers to the kernels and turns status codes into exceptions.
//
// CPU entry points take numpy arrays. The CUDA entry points live in the submodule `_core.cuda`,
// have the same names and argument order and take `Buffer`s (address, shape, dtype, device: a
// wrong size, dtype or device is a ValueError naming the buffer, never an out-of-bounds write) and a
// stream handle as an integer (0 = default stream); in a build without CUDA they raise
// RuntimeError. `RolloutCore` is the stream's state on one device (rollout.h).
// Build: `pip install --no-build-isolation -e .`.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "df_schedule.h"
#include "guidance.h"
#include "half.h"
#include "kv_cache.h"
#include "buffer.h"
#include "rolling_cache.h"
#include "rollout.h"
#include "rollout_state.h"
#include "samplers.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using CpuArray = nb::ndarray<float, nb::device::cpu, nb::c_contig>;
using CpuConstArray = nb::ndarray<const float, nb::device::cpu, nb::c_contig>;
using AnyCpuArray = nb::ndarray<nb::device::cpu>;  // dtype and strides checked by hand
using AnyCpuConstArray = nb::ndarray<nb::ro, nb::device::cpu>;

void check_status(int status, const char* what) {
  if (status != skyrt::kOk) throw std::runtime_error(std::string(what) + ": " + skyrt::status_message(status));
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
void* stream_of(uintptr_t s) { return reinterpret_cast<void*>(s); }  // cudaStream_t (0 = default)

// Runs a CPU reference with the GIL released (the serving threads keep running) and returns its status.
template <typename F>
int without_gil(F&& kernel) {
  nb::gil_scoped_release release;
  return kernel();
}

// A numpy array that owns a copy of `values`, shaped `shape` (C order).
template <typename T, typename Out = T>
nb::ndarray<nb::numpy, Out> to_numpy(std::vector<T> values, std::vector<size_t> shape) {
  static_assert(sizeof(T) == sizeof(Out), "element size mismatch");
  auto* heap = new std::vector<T>(std::move(values));
  heap->reserve(1);  // a valid pointer even when empty
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, Out>(reinterpret_cast<Out*>(heap->data()), shape.size(), shape.data(), owner);
}

// A 1-D numpy copy of a vector (bool arrays are stored as uint8).
template <typename Out = void, typename T>
auto vector_array(const std::vector<T>& v) {
  using O = std::conditional_t<std::is_void_v<Out>, T, Out>;
  return to_numpy<T, O>(v, {v.size()});
}

constexpr auto kMove = nb::rv_policy::move;  // properties return fresh arrays

// "Name(a=1, b=2)": the __repr__ of a plain record of integers.
std::string fields_repr(const char* name, std::initializer_list<std::pair<const char*, int64_t>> fields) {
  std::string out = std::string(name) + "(";
  const char* sep = "";
  for (const auto& [field, value] : fields) {
    out += sep + std::string(field) + "=" + std::to_string(value);
    sep = ", ";
  }
  return out + ")";
}

std::string dfstep_repr(const skyrt::DFStep& s) {
  return fields_repr("DFStep", {{"row", s.row}, {"first", s.first}, {"last", s.last}});
}

std::string kvappend_repr(const skyrt::KVAppend& a) {
  return fields_repr("KVAppend", {{"slot", a.slot}, {"evicted_block", a.evicted_block}, {"position", a.position}});
}

// Integers from a list, tuple, numpy array or torch tensor (anything with .tolist()).
std::vector<int64_t> int64_list(nb::handle values) {
  nb::object list = nb::hasattr(values, "tolist") ? values.attr("tolist")() : nb::borrow(values);
  try {
    return nb::cast<std::vector<int64_t>>(list);
  } catch (const nb::cast_error&) {
    throw nb::type_error("step_template must be a sequence of integers (list, numpy array or torch tensor)");
  }
}

template <typename A>
bool is_f32(const A& a) {
  return a.dtype() == nb::dtype<float>();
}
template <typename A>
bool is_f16(const A& a) {
  return a.dtype() == nb::dlpack::dtype{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
}

// ---- guidance --------------------------------------------------------------------------------------

void cfg_combine_binding(CpuConstArray cond, CpuConstArray uncond, CpuArray out, float scale) {
  require(cond.size() == uncond.size() && cond.size() == out.size(),
          "cfg_combine: cond, uncond and out must have the same number of elements");
  check_status(without_gil([&] {
                 return skyrt::cpu::cfg_combine(cond.data(), uncond.data(), out.data(), cond.size(), scale);
               }),
               "cfg_combine");
}

// ---- DF schedule -----------------------------------------------------------------------------------

skyrt::DFSchedule make_schedule(std::vector<int64_t> step_template, int64_t ar_step, int64_t causal_block_size, int64_t num_prefix_blocks,
                                int64_t max_blocks_in_flight, int64_t horizon_blocks) {
  // in the order DFScheduleConfig declares them
  const skyrt::DFScheduleConfig cfg{std::move(step_template), ar_step, causal_block_size, num_prefix_blocks,
                                    max_blocks_in_flight, horizon_blocks};
  std::string why;
  if (skyrt::df_schedule_check(cfg, &why) != skyrt::kOk) throw std::invalid_argument("DFSchedule: " + why);
  return skyrt::DFSchedule(cfg);
}

nb::object schedule_next(skyrt::DFSchedule& s) {
  skyrt::DFStep step;
  if (!s.next(&step)) return nb::none();
  return nb::cast(std::move(step));
}

nb::tuple df_timestep_matrix_binding(int64_t num_frames, nb::handle step_template,
                                     int64_t base_num_frames, int64_t ar_step, int64_t num_pre_ready,
                                     int64_t causal_block_size) {
  skyrt::DFMatrix m;
  std::string why;
  if (skyrt::df_timestep_matrix(num_frames, int64_list(step_template), base_num_frames, ar_step, num_pre_ready,
                                causal_block_size, &m, &why) != skyrt::kOk)
    throw std::invalid_argument("df_timestep_matrix: " + why);
  const size_t rows = static_cast<size_t>(m.rows), frames = static_cast<size_t>(m.frames);
  nb::list intervals;
  for (size_t r = 0; r < rows; ++r)
    intervals.append(nb::make_tuple(m.valid_interval[2 * r], m.valid_interval[2 * r + 1]));
  return nb::make_tuple(to_numpy(std::move(m.step_matrix), {rows, frames}),
                        to_numpy(std::move(m.step_index), {rows, frames}),
                        to_numpy<uint8_t, bool>(std::move(m.update_mask), {rows, frames}), intervals);
}

void bind_schedule(nb::module_& m) {
  nb::class_<skyrt::DFStep>(m, "DFStep", "One row of the DF schedule, restricted to the active blocks [first, last).")
      .def_ro("row", &skyrt::DFStep::row, "0-based row number")
      .def_ro("first", &skyrt::DFStep::first, "first active block (official valid_interval start)")
      .def_ro("last", &skyrt::DFStep::last, "one past the last active block (clipped to the horizon)")
      .def_prop_ro("index", [](const skyrt::DFStep& s) { return vector_array(s.index); }, kMove,
                   "int64 [last-first]: row index into [999, template..., 0] (0 = not started, S+1 = done)")
      .def_prop_ro("timestep", [](const skyrt::DFStep& s) { return vector_array(s.timestep); }, kMove,
                   "int64 [last-first]: timestep the model sees for each active block")
      .def_prop_ro("update", [](const skyrt::DFStep& s) { return vector_array<bool>(s.update); }, kMove,
                   "bool [last-first]: the sampler steps this block in this row (its step is index-1)")
      .def_prop_ro("finished", [](const skyrt::DFStep& s) { return vector_array(s.finished); }, kMove,
                   "int64: absolute ids of blocks whose last update is this row (clean afterwards)")
      .def("__repr__", &dfstep_repr);

  nb::class_<skyrt::DFSchedule>(
      m, "DFSchedule",
      "Streaming diffusion-forcing schedule, row for row the official generate_timestep_matrix.\n"
      "horizon_blocks=-1 streams forever; max_blocks_in_flight=0 means the horizon.")
      .def("__init__",
           [](skyrt::DFSchedule* self, nb::handle step_template, int64_t ar_step, int64_t causal_block_size, int64_t num_prefix_blocks, int64_t max_blocks_in_flight,
              int64_t horizon_blocks) {
             new (self) skyrt::DFSchedule(make_schedule(int64_list(step_template), ar_step, causal_block_size, num_prefix_blocks,
                                                        max_blocks_in_flight, horizon_blocks));
           },
           "step_template"_a, "ar_step"_a = 0, "causal_block_size"_a = 1, "num_prefix_blocks"_a = 0,
           "max_blocks_in_flight"_a = 0, "horizon_blocks"_a = -1)
      .def("next", &schedule_next, "The next DFStep, or None once a finite horizon is done.")
      .def("__iter__", [](nb::object self) { return self; })
      .def("__next__",
           [](skyrt::DFSchedule& s) {
             skyrt::DFStep step;
             if (!s.next(&step)) throw nb::stop_iteration();
             return step;
           })
      .def("reset", &skyrt::DFSchedule::reset)
      .def("index_of", &skyrt::DFSchedule::index_of, "block"_a, "Template index of `block` in the last row yielded.")
      .def("timestep_of_index", &skyrt::DFSchedule::timestep_of_index, "index"_a)
      .def_prop_ro("done", &skyrt::DFSchedule::done)
      .def_prop_ro("rows", &skyrt::DFSchedule::rows, "rows yielded so far")
      .def_prop_ro("num_steps", &skyrt::DFSchedule::num_steps)
      .def_prop_ro("window", &skyrt::DFSchedule::window, "max blocks in flight (resolved)")
      .def_prop_ro("terminal_flag", &skyrt::DFSchedule::terminal_flag)
      .def_prop_ro("ar_step", [](const skyrt::DFSchedule& s) { return s.config().ar_step; })
      .def_prop_ro("causal_block_size", [](const skyrt::DFSchedule& s) { return s.config().causal_block_size; })
      .def_prop_ro("num_prefix_blocks", [](const skyrt::DFSchedule& s) { return s.config().num_prefix_blocks; })
      .def_prop_ro("horizon_blocks", [](const skyrt::DFSchedule& s) { return s.config().horizon_blocks; })
      .def_prop_ro("step_template", [](const skyrt::DFSchedule& s) { return vector_array(s.config().step_template); },
                   kMove);

  m.def("df_timestep_matrix", &df_timestep_matrix_binding, "num_frames"_a, "step_template"_a, "base_num_frames"_a,
        "ar_step"_a = 5, "num_pre_ready"_a = 0, "causal_block_size"_a = 1,
        "(step_matrix, step_index, update_mask, valid_interval) in frames, as the official "
        "generate_timestep_matrix, built from DFSchedule with a horizon. Frame counts must be multiples "
        "of causal_block_size.");
}

// ---- KV cache --------------------------------------------------------------------------------------

void kv_write_block_binding(AnyCpuArray cache, int64_t slot, AnyCpuConstArray src) {
  require(cache.dtype() == src.dtype() && (is_f32(cache) || is_f16(cache)),
          "kv_write_block: cache and src must both be float32 or both float16");
  require(cache.ndim() >= 2 && src.ndim() == cache.ndim() - 1,
          "kv_write_block: cache is [layers, slots, ...] and src [layers, ...]");
  require(slot >= 0 && static_cast<size_t>(slot) < cache.shape(1), "kv_write_block: slot out of range");
  int64_t block_elems = 1;
  for (size_t d = 2; d < cache.ndim(); ++d) {
    require(cache.shape(d) == src.shape(d - 1), "kv_write_block: block shapes differ");
    block_elems *= static_cast<int64_t>(cache.shape(d));
  }
  require(cache.shape(0) == src.shape(0), "kv_write_block: layer counts differ");
  // The per-layer block must be contiguous in both arrays.
  int64_t expect = 1;
  for (size_t d = cache.ndim() - 1; d >= 2; --d) {
    require(cache.stride(d) == expect && src.stride(d - 1) == expect, "kv_write_block: block not contiguous");
    expect *= static_cast<int64_t>(cache.shape(d));
  }
  const int64_t layers = static_cast<int64_t>(cache.shape(0));
  const bool f32 = is_f32(cache);
  const int status = without_gil([&] {
    if (f32)
      return skyrt::cpu::kv_write_block(static_cast<const float*>(src.data()), src.stride(0),
                                        static_cast<float*>(cache.data()), cache.stride(0), cache.stride(1), slot,
                                        layers, block_elems);
    return skyrt::cpu::kv_write_block(static_cast<const skyrt::f16*>(src.data()), src.stride(0),
                                      static_cast<skyrt::f16*>(cache.data()), cache.stride(0), cache.stride(1), slot,
                                      layers, block_elems);
  });
  check_status(status, "kv_write_block");
}

void kv_rope_rebase_binding(AnyCpuArray keys, int64_t shift, double theta) {
  require(is_f32(keys) || is_f16(keys), "kv_rope_rebase: keys must be float32 or float16");
  require(keys.ndim() == 5, "kv_rope_rebase: keys must be [layers, slots, tokens, heads, head_dim]");
  require(keys.stride(4) == 1, "kv_rope_rebase: head_dim must be contiguous");
  int64_t sh[5], st[5];
  for (int d = 0; d < 5; ++d) {
    sh[d] = static_cast<int64_t>(keys.shape(d));
    st[d] = keys.stride(d);
  }
  const bool f32 = is_f32(keys);
  const int status = without_gil([&] {
    if (f32)
      return skyrt::cpu::kv_rope_rebase(static_cast<float*>(keys.data()), sh[0], sh[1], sh[2], sh[3], sh[4], st[0],
                                        st[1], st[2], st[3], shift, theta);
    return skyrt::cpu::kv_rope_rebase(static_cast<skyrt::f16*>(keys.data()), sh[0], sh[1], sh[2], sh[3], sh[4], st[0],
                                      st[1], st[2], st[3], shift, theta);
  });
  check_status(status, "kv_rope_rebase");
}

void bind_kv_cache(nb::module_& m) {
  nb::class_<skyrt::KVAppend>(m, "KVAppend", "Where an appended block goes.")
      .def_ro("slot", &skyrt::KVAppend::slot)
      .def_ro("evicted_block", &skyrt::KVAppend::evicted_block, "block whose slot was overwritten, -1 if none")
      .def_ro("position", &skyrt::KVAppend::position, "RoPE temporal position of the block's first frame")
      .def("__repr__", &kvappend_repr);

  const char* ring_doc =
      "Slot bookkeeping of the ring KV cache: sink slots keep the first blocks, window slots form a ring.\n"
      "Block b's keys are stored rotated at position b * frames_per_block - origin.";
  nb::class_<skyrt::KVRing>(m, "KVRing", ring_doc)
      .def("__init__",
           [](skyrt::KVRing* self, int64_t sink_blocks, int64_t window_blocks, int64_t frames_per_block) {
             std::string why;
             if (skyrt::KVRing::check(sink_blocks, window_blocks, frames_per_block, &why) != skyrt::kOk)
               throw std::invalid_argument("KVRing: " + why);
             new (self) skyrt::KVRing(sink_blocks, window_blocks, frames_per_block);
           },
           "sink_blocks"_a, "window_blocks"_a, "frames_per_block"_a = 1)
      .def("append",
           [](skyrt::KVRing& r, int64_t block) {
             skyrt::KVAppend a;
             require(r.append(block, &a) == skyrt::kOk,
                     "KVRing.append: blocks must be appended in increasing order (got " + std::to_string(block) + ")");
             return a;
           },
           "block"_a, "Reserve the slot for finished block `block` (evicting the oldest window block when full).")
      .def("rebase", &skyrt::KVRing::rebase, "shift"_a,
           "origin += shift and cached positions -= shift; call kv_rope_rebase(keys, shift) on the K buffer too.")
      .def("reset", &skyrt::KVRing::reset)
      .def("position_of", &skyrt::KVRing::position_of, "block"_a)
      .def("slots_in_order", [](const skyrt::KVRing& r) { return vector_array(r.slots_in_order()); },
           "valid slots, sinks first then the window oldest first")
      .def_prop_ro("capacity", &skyrt::KVRing::capacity)
      .def_prop_ro("sink_blocks", &skyrt::KVRing::sink_blocks)
      .def_prop_ro("window_blocks", &skyrt::KVRing::window_blocks)
      .def_prop_ro("frames_per_block", &skyrt::KVRing::frames_per_block)
      .def_prop_ro("size", &skyrt::KVRing::size, "valid slots")
      .def_prop_ro("appended", &skyrt::KVRing::appended)
      .def_prop_ro("origin", &skyrt::KVRing::origin)
      .def_prop_ro("slot_block", [](const skyrt::KVRing& r) { return vector_array(r.slot_block()); }, kMove,
                   "int64 [capacity]: absolute block id held by each slot, -1 = empty")
      .def_prop_ro("slot_position", [](const skyrt::KVRing& r) { return vector_array(r.slot_position()); }, kMove,
                   "int64 [capacity]: RoPE position (frames) of each slot's first frame, 0 if empty")
      .def_prop_ro(
          "valid",
          [](const skyrt::KVRing& r) {
            std::vector<uint8_t> v(r.slot_block().size());
            for (size_t i = 0; i < v.size(); ++i) v[i] = r.slot_block()[i] >= 0;
            return vector_array<bool>(v);
          },
          kMove, "bool [capacity]: slot holds a block");

  m.def("kv_write_block", &kv_write_block_binding, "cache"_a, "slot"_a, "src"_a,
        "cache[:, slot] = src; cache [layers, slots, ...] and src [layers, ...], float32 or float16.");
  m.def("kv_rope_rebase", &kv_rope_rebase_binding, "keys"_a, "shift"_a, "theta"_a = 10000.0,
        "Rotate the temporal RoPE part of keys [layers, slots, tokens, heads, head_dim] (float32 or float16, "
        "head_dim contiguous, in place) by -shift positions.");
  m.def("rope_temporal_dim", &skyrt::rope_temporal_dim, "head_dim"_a, "head_dim - 4 * (head_dim // 6)");
}

// ---- samplers --------------------------------------------------------------------------------------

struct Layout {
  int64_t outer = 1, frames = 1, inner = 1;
};

Layout frame_layout(const CpuConstArray& x, int64_t frame_axis, const char* what) {
  const int64_t nd = static_cast<int64_t>(x.ndim());
  if (frame_axis < 0) frame_axis += nd;
  require(frame_axis >= 0 && frame_axis < nd, std::string(what) + ": frame_axis out of range");
  Layout l;
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t n = static_cast<int64_t>(x.shape(static_cast<size_t>(d)));
    if (d < frame_axis) l.outer *= n;
    else if (d == frame_axis) l.frames = n;
    else l.inner *= n;
  }
  return l;
}

void same_size(size_t a, size_t b, const char* what, const char* name) {
  require(a == b, std::string(what) + ": " + name + " must have as many elements as x");
}

void flow_euler_binding(CpuConstArray x, CpuConstArray v, CpuArray out, CpuConstArray dt,
                        std::optional<nb::ndarray<const bool, nb::ndim<1>, nb::device::cpu, nb::c_contig>> update,
                        int64_t frame_axis) {
  const Layout l = frame_layout(x, frame_axis, "flow_euler");
  same_size(v.size(), x.size(), "flow_euler", "v");
  same_size(out.size(), x.size(), "flow_euler", "out");
  require(dt.size() == static_cast<size_t>(l.frames), "flow_euler: dt must have one entry per frame");
  const uint8_t* upd = nullptr;
  if (update) {
    require(update->shape(0) == static_cast<size_t>(l.frames), "flow_euler: update must have one entry per frame");
    upd = reinterpret_cast<const uint8_t*>(update->data());
  }
  check_status(without_gil([&] {
                 return skyrt::cpu::flow_euler(x.data(), v.data(), out.data(), dt.data(), upd, l.outer, l.frames,
                                               l.inner);
               }),
               "flow_euler");
}

nb::ndarray<nb::numpy, float> unipc_frame_coeffs_binding(
    nb::ndarray<const double, nb::ndim<1>, nb::device::cpu, nb::c_contig> sigmas,
    nb::ndarray<const int64_t, nb::ndim<1>, nb::device::cpu, nb::c_contig> steps) {
  const size_t frames = steps.shape(0);
  std::vector<float> table(frames * skyrt::kUniPCCoeffs);
  const int status =
      skyrt::unipc_frame_coeffs(sigmas.data(), static_cast<int64_t>(sigmas.shape(0)), steps.data(),
                                static_cast<int64_t>(frames), reinterpret_cast<skyrt::UniPCFrameCoeffs*>(table.data()));
  if (status != skyrt::kOk)
    throw std::invalid_argument(
        "unipc_frame_coeffs: sigmas must be [S+1] with sigmas[:S] in (0, 1) and sigmas[S] in [0, 1); "
        "steps must be < S (negative = no update)");
  return to_numpy(std::move(table), {frames, static_cast<size_t>(skyrt::kUniPCCoeffs)});
}

void flow_unipc_binding(CpuConstArray x, CpuConstArray v, CpuArray out, CpuArray x_last, CpuArray m1, CpuArray m2,
                        CpuConstArray coeffs, int64_t frame_axis, bool official_df_aliasing) {
  const Layout l = frame_layout(x, frame_axis, "flow_unipc");
  same_size(v.size(), x.size(), "flow_unipc", "v");
  same_size(out.size(), x.size(), "flow_unipc", "out");
  same_size(x_last.size(), x.size(), "flow_unipc", "x_last");
  same_size(m1.size(), x.size(), "flow_unipc", "m1");
  same_size(m2.size(), x.size(), "flow_unipc", "m2");
  require(coeffs.ndim() == 2 && coeffs.shape(0) == static_cast<size_t>(l.frames) &&
              coeffs.shape(1) == static_cast<size_t>(skyrt::kUniPCCoeffs),
          "flow_unipc: coeffs must be [frames, 12] (from unipc_frame_coeffs)");
  const auto* table = reinterpret_cast<const skyrt::UniPCFrameCoeffs*>(coeffs.data());
  check_status(without_gil([&] {
                 return skyrt::cpu::flow_unipc(x.data(), v.data(), out.data(), x_last.data(), m1.data(), m2.data(),
                                               table, l.outer, l.frames, l.inner, official_df_aliasing);
               }),
               "flow_unipc");
}

void addnoise_condition_binding(CpuConstArray x, CpuConstArray noise, CpuArray out, double factor,
                                int64_t frame_begin, int64_t frame_end, int64_t frame_axis) {
  const Layout l = frame_layout(x, frame_axis, "addnoise_condition");
  same_size(noise.size(), x.size(), "addnoise_condition", "noise");
  same_size(out.size(), x.size(), "addnoise_condition", "out");
  check_status(without_gil([&] {
                 return skyrt::cpu::addnoise_condition(x.data(), noise.data(), out.data(), l.outer, l.frames,
                                                       l.inner, frame_begin, frame_end, factor);
               }),
               "addnoise_condition");
}

void flow_fewstep_binding(CpuConstArray x, CpuConstArray v, std::optional<CpuConstArray> noise, CpuArray out,
                          float sigma, float next_sigma) {
  same_size(v.size(), x.size(), "flow_fewstep", "v");
  same_size(out.size(), x.size(), "flow_fewstep", "out");
  if (noise) same_size(noise->size(), x.size(), "flow_fewstep", "noise");
  require(sigma >= 0.0f && sigma <= 1.0f && next_sigma >= 0.0f && next_sigma <= 1.0f,
          "flow_fewstep: sigma and next_sigma must lie in [0, 1]");
  const float* n = noise ? noise->data() : nullptr;
  check_status(without_gil([&] {
                 return skyrt::cpu::flow_fewstep(x.data(), v.data(), n, out.data(), static_cast<int64_t>(x.size()),
                                                 sigma, next_sigma);
               }),
               "flow_fewstep");
}

void bind_samplers(nb::module_& m) {
  m.attr("UNIPC_COEFFS") = skyrt::kUniPCCoeffs;
  m.def("flow_euler", &flow_euler_binding, "x"_a, "v"_a, "out"_a, "dt"_a, "update"_a = nb::none(),
        "frame_axis"_a = 1,
        "out = x + dt[f] * v per frame f (float32, C-contiguous; frames along frame_axis); frames with "
        "update[f] False are copied.");
  m.def("unipc_frame_coeffs", &unipc_frame_coeffs_binding, "sigmas"_a, "steps"_a,
        "float32 [frames, 12] per-frame FlowUniPC (order 2, bh2) coefficients for step steps[f] of the float64 "
        "sigma schedule [S+1] (computed in double); steps[f] < 0 = frame not updated.");
  m.def("flow_unipc", &flow_unipc_binding, "x"_a, "v"_a, "out"_a, "x_last"_a, "m1"_a, "m2"_a, "coeffs"_a,
        "frame_axis"_a = 1, "official_df_aliasing"_a = false,
        "One per-frame FlowUniPC step: out = next sample; x_last, m1, m2 (the frame's history, same shape as x) "
        "are updated in place. out may be x. official_df_aliasing: keep a frame's first output, not its input, "
        "as the corrector's last sample (what the official DF loop computes; samplers.h).");
  m.def("addnoise_condition", &addnoise_condition_binding, "x"_a, "noise"_a, "out"_a, "factor"_a,
        "frame_begin"_a, "frame_end"_a, "frame_axis"_a = 1,
        "out = x * (1 - factor) + noise * factor on frames [frame_begin, frame_end), copy elsewhere.");
  m.def("flow_fewstep", &flow_fewstep_binding, "x"_a, "v"_a, "noise"_a, "out"_a, "sigma"_a, "next_sigma"_a = 0.0f,
        "One few-step sampler step (the causal Wan family): x0 = x - sigma * v in float64, rounded to float32; "
        "out = (1 - next_sigma) * x0 + next_sigma * noise in float32, or out = x0 when noise is None (the last "
        "step). out may be x.");
}

// ---- Buffers: memory with its size, dtype and device ------------------------------------------------

using skyrt::Buffer;

const Buffer& as_buffer(nb::handle h, const char* fn, const char* name) {
  if (!nb::isinstance<Buffer>(h))
    throw nb::type_error((std::string(fn) + ": " + name + " must be a skyrt._core.Buffer (Buffer.wrap(ptr, shape, dtype, "
                          "device) for memory allocated elsewhere), got " + nb::type_name(h.type()).c_str()).c_str());
  return nb::cast<const Buffer&>(h);
}

skyrt::DType dtype_of(const std::string& name) {
  skyrt::DType d;
  require(skyrt::parse_dtype(name, &d), "dtype '" + name + "' is not one of float32, float16, uint8");
  return d;
}

skyrt::Device device_of(const std::string& name) {
  skyrt::Device d;
  require(skyrt::parse_device(name, &d), "device '" + name + "' is not 'cpu', 'cuda' or 'cuda:N'");
  return d;
}

// numpy view of host memory; the array keeps the allocation alive (a copy of its owner).
nb::object numpy_view(const Buffer& b) {
  require(!b.device.cuda, "Buffer.numpy(): " + b.describe() + " is not host memory");
  std::vector<size_t> shape(b.shape.begin(), b.shape.end());
  nb::object owner = nb::none();
  if (b.owner) {
    auto* keep = new std::shared_ptr<void>(b.owner);
    owner = nb::capsule(keep, [](void* p) noexcept { delete static_cast<std::shared_ptr<void>*>(p); });
  }
  nb::dlpack::dtype dt = b.dtype == skyrt::kFloat32   ? nb::dtype<float>()
                         : b.dtype == skyrt::kFloat16 ? nb::dlpack::dtype{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1}
                         : b.dtype == skyrt::kInt64   ? nb::dtype<int64_t>()
                                                      : nb::dtype<uint8_t>();
  nb::ndarray<nb::numpy> array(b.ptr, shape.size(), shape.data(), owner, nullptr, dt);
  return nb::cast(array, nb::rv_policy::reference);
}

// The DType of a numpy array (bool travels as uint8), or a ValueError naming what is accepted.
skyrt::DType array_dtype(const nb::dlpack::dtype& dt, const char* fn) {
  using Code = nb::dlpack::dtype_code;
  const auto code = static_cast<Code>(dt.code);
  if (code == Code::Float && dt.bits == 32) return skyrt::kFloat32;
  if (code == Code::Float && dt.bits == 16) return skyrt::kFloat16;
  if ((code == Code::UInt || code == Code::Bool) && dt.bits == 8) return skyrt::kUInt8;
  if (code == Code::Int && dt.bits == 64) return skyrt::kInt64;
  throw std::invalid_argument(std::string(fn) + ": arrays must be float32, float16, uint8/bool or int64");
}

// Host array <-> the first bytes of a Buffer: the dtype must match and the array must fit.
void expect_fits(const Buffer& b, skyrt::DType dtype, size_t nbytes, const char* fn, const char* what) {
  require(b.ptr != nullptr, std::string(fn) + ": the buffer is released (closed)");
  require(b.dtype == dtype, std::string(fn) + ": " + what + " is " + skyrt::dtype_name(dtype) + " but the buffer is " +
                                b.describe());
  require(nbytes <= b.nbytes(), std::string(fn) + ": " + what + " of " + std::to_string(nbytes) +
                                    " bytes does not fit the buffer " + b.describe());
}

using HostIn = nb::ndarray<nb::ro, nb::device::cpu, nb::c_contig>;
using HostOut = nb::ndarray<nb::device::cpu, nb::c_contig>;

void bind_buffer(nb::module_& m) {
  nb::class_<Buffer>(m, "Buffer",
                     "Typed memory on one device: address, shape, dtype, device. Kernels check all four.\n"
                     "Host buffers give zero-copy numpy views (numpy()); CUDA buffers offer "
                     "__cuda_array_interface__ (torch.as_tensor reads it) and their address (ptr).")
      .def_static(
          "wrap",
          [](uintptr_t ptr, std::vector<int64_t> shape, const std::string& dtype, const std::string& device) {
            Buffer b;
            b.ptr = as_ptr(ptr);
            b.dtype = dtype_of(dtype);
            b.device = device_of(device);
            for (int64_t d : shape) require(d >= 0, "Buffer.wrap: negative dimension");
            b.shape = std::move(shape);
            require(b.ptr != nullptr || b.numel() == 0, "Buffer.wrap: null address for " + b.describe());
            return b;
          },
          "ptr"_a, "shape"_a, "dtype"_a, "device"_a,
          "A non-owning Buffer over memory allocated elsewhere (a torch tensor, a cuda_mem.DeviceArray).")
      .def_static(
          "allocate",
          [](std::vector<int64_t> shape, const std::string& dtype, const std::string& device, bool zero,
             uintptr_t stream) {
            const skyrt::Device d = device_of(device);
#ifndef SKYRT_WITH_CUDA
            require(!d.cuda, "Buffer.allocate on " + device + ": " + skyrt::status_message(skyrt::kNotCompiled));
#endif
            for (int64_t n : shape) require(n >= 0, "Buffer.allocate: negative dimension");
            Buffer b = skyrt::allocate(d, dtype_of(dtype), std::move(shape), zero, stream_of(stream));
            if (zero) check_status(skyrt::synchronize(d, stream_of(stream)), "Buffer.allocate");
            return b;
          },
          "shape"_a, "dtype"_a, "device"_a = "cpu", "zero"_a = true, "stream"_a = 0,
          "Memory owned by this Buffer (counted by memory_stats), freed by close() or when the last owner goes. "
          "Slices of device memory never own it, so close() frees it at once.")
      .def("close",
           [](Buffer& b) {
             b.owner.reset();
             b.ptr = nullptr;
             b.shape.assign(1, 0);
           },
           "Drop this Buffer's memory now (an owning Buffer frees it; host numpy views keep theirs alive).")
      .def_prop_ro("owning", [](const Buffer& b) { return static_cast<bool>(b.owner); })
      .def("slice",
           [](const Buffer& b, std::vector<int64_t> shape, int64_t offset) {
             Buffer probe;
             probe.dtype = b.dtype;
             probe.shape = shape;
             require(b.ptr != nullptr, "Buffer.slice: the buffer is released (closed)");
             require(offset >= 0 && offset + probe.numel() <= b.numel(),
                     "Buffer.slice: " + std::to_string(probe.numel()) + " elements from element " +
                         std::to_string(offset) + " do not fit " + b.describe());
             Buffer out = b.device.cuda ? b.view() : b;
             return out.slice(offset, std::move(shape));
           },
           "shape"_a, "offset"_a = 0,
           "The contiguous elements [offset, offset + prod(shape)) as a Buffer of `shape` (bounds checked; a "
           "device slice does not own the memory).")
      .def_prop_ro("ptr", [](const Buffer& b) { return reinterpret_cast<uintptr_t>(b.ptr); })
      .def_prop_ro("shape", [](const Buffer& b) { return nb::tuple(nb::cast(b.shape)); })
      .def_prop_ro("dtype", [](const Buffer& b) { return std::string(skyrt::dtype_name(b.dtype)); })
      .def_prop_ro("device", [](const Buffer& b) { return b.device.str(); })
      .def_prop_ro("nbytes", &Buffer::nbytes)
      .def_prop_ro("numel", &Buffer::numel)
      .def("numpy", &numpy_view, "A zero-copy numpy view (host memory only).")
      .def_prop_ro("__cuda_array_interface__",
                   [](const Buffer& b) {
                     require(b.device.cuda, "__cuda_array_interface__: " + b.describe() + " is host memory");
                     nb::dict d;
                     d["shape"] = nb::tuple(nb::cast(b.shape));
                     d["typestr"] = b.dtype == skyrt::kFloat32   ? "<f4"
                                   : b.dtype == skyrt::kFloat16 ? "<f2"
                                   : b.dtype == skyrt::kInt64   ? "<i8"
                                                                : "|u1";
                     d["data"] = nb::make_tuple(reinterpret_cast<uintptr_t>(b.ptr), false);
                     d["version"] = 3;
                     d["strides"] = nb::none();
                     d["stream"] = nb::none();  // the caller orders work on the core's stream
                     return d;
                   })
      .def("__repr__", [](const Buffer& b) { return "Buffer(" + b.describe() + ")"; });

  m.def("upload",
        [](Buffer& dst, HostIn src, uintptr_t stream) {
          const skyrt::DType dt = array_dtype(src.dtype(), "upload");
          expect_fits(dst, dt, src.nbytes(), "upload", "the array");
          const void* data = src.data();
          const size_t bytes = src.nbytes();
          nb::gil_scoped_release release;
          check_status(skyrt::copy_bytes(dst.ptr, dst.device, data, skyrt::Device{}, bytes, stream_of(stream)), "upload");
        },
        "dst"_a, "src"_a.noconvert(), "stream"_a = 0,
        "Copy a C-contiguous host array into the start of `dst` (same dtype, must fit); returns when the copy is "
        "done, so `src` may be reused.");
  m.def("download",
        [](const Buffer& src, HostOut out, uintptr_t stream) {
          const skyrt::DType dt = array_dtype(out.dtype(), "download");
          expect_fits(src, dt, out.nbytes(), "download", "the output array");
          void* data = out.data();
          const size_t bytes = out.nbytes();
          nb::gil_scoped_release release;
          check_status(skyrt::copy_bytes(data, skyrt::Device{}, src.ptr, src.device, bytes, stream_of(stream)),
                       "download");
        },
        "src"_a, "out"_a.noconvert(), "stream"_a = 0,
        "Copy the first out.nbytes bytes of `src` into the C-contiguous host array `out` (same dtype); waits for "
        "the stream.");
  m.def("copy",
        [](Buffer& dst, const Buffer& src, uintptr_t stream) {
          expect_fits(dst, src.dtype, src.nbytes(), "copy", ("the source " + src.describe()).c_str());
          nb::gil_scoped_release release;
          check_status(skyrt::copy_bytes(dst.ptr, dst.device, src.ptr, src.device, src.nbytes(), stream_of(stream)),
                       "copy");
        },
        "dst"_a, "src"_a, "stream"_a = 0, "Copy all of `src` into the start of `dst` (async on a GPU stream).");
  m.def("fill_zero",
        [](Buffer& b, uintptr_t stream) {
          require(b.ptr != nullptr || b.numel() == 0, "fill_zero: the buffer is released (closed)");
          check_status(skyrt::fill_zero(b.ptr, b.nbytes(), b.device, stream_of(stream)), "fill_zero");
        },
        "buffer"_a, "stream"_a = 0);
  m.def("synchronize",
        [](const std::string& device, uintptr_t stream) {
          const skyrt::Device d = device_of(device);
          nb::gil_scoped_release release;
          check_status(skyrt::synchronize(d, stream_of(stream)), "synchronize");
        },
        "device"_a, "stream"_a = 0, "Wait for the stream's work on `device` (nothing to wait for on the CPU).");

  m.def("memory_stats", []() {
    const skyrt::MemoryStats s = skyrt::memory_stats();
    nb::dict d;
    d["allocations"] = s.allocations;
    d["frees"] = s.frees;
    d["live"] = s.live;
    d["live_bytes"] = s.live_bytes;
    return d;
  }, "Counters of the core's own allocations (host and device): allocations, frees, live, live_bytes.");
}

// ---- CUDA entry points: Buffers in, sizes and dtypes checked ----------------------------------------


void require_cuda(const char* fn) {
#ifndef SKYRT_WITH_CUDA
  throw std::runtime_error(std::string(fn) + ": " + skyrt::status_message(skyrt::kNotCompiled));
#else
  (void)fn;
#endif
}

void expect(const Buffer& b, const char* fn, const char* name, bool f16_ok = false) {
  require(b.device.cuda, std::string(fn) + ": " + name + " is " + b.describe() + "; it must be CUDA memory");
  const bool ok = b.dtype == skyrt::kFloat32 || (f16_ok && b.dtype == skyrt::kFloat16);
  require(ok, std::string(fn) + ": " + name + " is " + b.describe() + "; it must be float32" +
                  (f16_ok ? " or float16" : ""));
}

void expect_like(const Buffer& b, const Buffer& ref, const char* fn, const char* name, const char* ref_name) {
  require(b.device == ref.device, std::string(fn) + ": " + name + " is on " + b.device.str() + ", " + ref_name +
                                      " on " + ref.device.str());
  require(b.dtype == ref.dtype && b.numel() == ref.numel(),
          std::string(fn) + ": " + name + " is " + b.describe() + " but " + ref_name + " is " + ref.describe() +
              " (same dtype and element count needed)");
}

// The Buffers of an elementwise kernel: an input, a second input and an output of the first's shape,
// dtype and device, each refused by name when it is not what the kernel takes.
std::array<const Buffer*, 3> elementwise_buffers(const char* fn, nb::handle first_h, const char* first,
                                                 nb::handle second_h, const char* second, nb::handle out_h) {
  require_cuda(fn);
  const Buffer &a = as_buffer(first_h, fn, first), &b = as_buffer(second_h, fn, second),
               &out = as_buffer(out_h, fn, "out");
  expect(a, fn, first);
  expect_like(b, a, fn, second, first);
  expect_like(out, a, fn, "out", first);
  return {&a, &b, &out};
}

Layout buffer_layout(const Buffer& x, int64_t frame_axis, const char* fn) {
  const int64_t nd = static_cast<int64_t>(x.shape.size());
  if (frame_axis < 0) frame_axis += nd;
  require(frame_axis >= 0 && frame_axis < nd, std::string(fn) + ": frame_axis out of range for " + x.describe());
  Layout l;
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t n = x.shape[static_cast<size_t>(d)];
    if (d < frame_axis) l.outer *= n;
    else if (d == frame_axis) l.frames = n;
    else l.inner *= n;
  }
  return l;
}

void expect_per_frame(const Buffer& b, int64_t frames, int64_t width, skyrt::DType dtype, const Buffer& x,
                      const char* fn, const char* name) {
  require(b.device == x.device && b.dtype == dtype && b.numel() == frames * width,
          std::string(fn) + ": " + name + " is " + b.describe() + "; it must be " + skyrt::dtype_name(dtype) + " with " +
              std::to_string(frames * width) + " elements on " + x.device.str());
}

void bind_cuda(nb::module_& m) {
  nb::module_ c = m.def_submodule(
      "cuda", "CUDA kernels on Buffers of device memory, with a stream (int, 0 = default); same names and argument "
              "order as the CPU references. Every call checks device, dtype and sizes and names the offending "
              "buffer. Raise RuntimeError when this build has no CUDA.");
  c.def("available", []() {
#ifdef SKYRT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  c.def("cfg_combine",
        [](nb::handle cond_h, nb::handle uncond_h, nb::handle out_h, float scale, uintptr_t stream) {
          const char* fn = "cuda.cfg_combine";
          const auto [cond, uncond, out] = elementwise_buffers(fn, cond_h, "cond", uncond_h, "uncond", out_h);
          check_status(skyrt::cuda::cfg_combine(static_cast<const float*>(cond->ptr), static_cast<const float*>(uncond->ptr),
                                                static_cast<float*>(out->ptr), static_cast<size_t>(cond->numel()), scale,
                                                stream_of(stream)),
                       fn);
        },
        "cond"_a, "uncond"_a, "out"_a, "scale"_a, "stream"_a = 0);
  c.def("kv_write_block",
        [](nb::handle cache_h, int64_t slot, nb::handle src_h, uintptr_t stream) {
          require_cuda("cuda.kv_write_block");
          const char* fn = "cuda.kv_write_block";
          const Buffer &cache = as_buffer(cache_h, fn, "cache"), &src = as_buffer(src_h, fn, "src");
          expect(cache, fn, "cache", true);
          require(src.device == cache.device && src.dtype == cache.dtype,
                  std::string(fn) + ": src is " + src.describe() + ", cache " + cache.describe());
          require(cache.shape.size() >= 2 && src.shape.size() == cache.shape.size() - 1 && src.shape[0] == cache.shape[0],
                  std::string(fn) + ": cache [layers, slots, ...] " + cache.describe() + " and src [layers, ...] " +
                      src.describe() + " do not match");
          int64_t block = 1;
          for (size_t d = 2; d < cache.shape.size(); ++d) {
            require(cache.shape[d] == src.shape[d - 1], std::string(fn) + ": block shapes differ: cache " +
                                                            cache.describe() + ", src " + src.describe());
            block *= cache.shape[d];
          }
          require(slot >= 0 && slot < cache.shape[1], std::string(fn) + ": slot " + std::to_string(slot) +
                                                          " out of range for " + cache.describe());
          const int64_t layers = cache.shape[0], slots = cache.shape[1];
          int st;
          if (cache.dtype == skyrt::kFloat16)
            st = skyrt::cuda::kv_write_block(static_cast<const skyrt::f16*>(src.ptr), block,
                                             static_cast<skyrt::f16*>(cache.ptr), slots * block, block, slot, layers,
                                             block, stream_of(stream));
          else
            st = skyrt::cuda::kv_write_block(static_cast<const float*>(src.ptr), block, static_cast<float*>(cache.ptr),
                                             slots * block, block, slot, layers, block, stream_of(stream));
          check_status(st, fn);
        },
        "cache"_a, "slot"_a, "src"_a, "stream"_a = 0, "cache[:, slot] = src, as the CPU reference.");
  c.def("kv_rope_rebase",
        [](nb::handle keys_h, int64_t shift, double theta, uintptr_t stream) {
          require_cuda("cuda.kv_rope_rebase");
          const char* fn = "cuda.kv_rope_rebase";
          const Buffer& keys = as_buffer(keys_h, fn, "keys");
          expect(keys, fn, "keys", true);
          require(keys.shape.size() == 5, std::string(fn) + ": keys must be [layers, slots, tokens, heads, head_dim], got " +
                                              keys.describe());
          const auto& s = keys.shape;
          const int64_t hs = s[4], ts = s[3] * hs, ss = s[2] * ts, ls = s[1] * ss;
          int st;
          if (keys.dtype == skyrt::kFloat16)
            st = skyrt::cuda::kv_rope_rebase(static_cast<skyrt::f16*>(keys.ptr), s[0], s[1], s[2], s[3], s[4], ls, ss, ts,
                                             hs, shift, theta, stream_of(stream));
          else
            st = skyrt::cuda::kv_rope_rebase(static_cast<float*>(keys.ptr), s[0], s[1], s[2], s[3], s[4], ls, ss, ts, hs,
                                             shift, theta, stream_of(stream));
          check_status(st, fn);
        },
        "keys"_a, "shift"_a, "theta"_a = 10000.0, "stream"_a = 0);
  c.def("flow_euler",
        [](nb::handle x_h, nb::handle v_h, nb::handle out_h, nb::handle dt_h, nb::handle update_h, int64_t frame_axis,
           uintptr_t stream) {
          require_cuda("cuda.flow_euler");
          const char* fn = "cuda.flow_euler";
          const Buffer &x = as_buffer(x_h, fn, "x"), &v = as_buffer(v_h, fn, "v"), &out = as_buffer(out_h, fn, "out"),
                       &dt = as_buffer(dt_h, fn, "dt");
          expect(x, fn, "x");
          expect_like(v, x, fn, "v", "x");
          expect_like(out, x, fn, "out", "x");
          const Layout l = buffer_layout(x, frame_axis, fn);
          expect_per_frame(dt, l.frames, 1, skyrt::kFloat32, x, fn, "dt");
          const uint8_t* update = nullptr;
          if (!update_h.is_none()) {
            const Buffer& u = as_buffer(update_h, fn, "update");
            expect_per_frame(u, l.frames, 1, skyrt::kUInt8, x, fn, "update");
            update = static_cast<const uint8_t*>(u.ptr);
          }
          check_status(skyrt::cuda::flow_euler(static_cast<const float*>(x.ptr), static_cast<const float*>(v.ptr),
                                               static_cast<float*>(out.ptr), static_cast<const float*>(dt.ptr), update,
                                               l.outer, l.frames, l.inner, stream_of(stream)),
                       fn);
        },
        "x"_a, "v"_a, "out"_a, "dt"_a, "update"_a = nb::none(), "frame_axis"_a = 1, "stream"_a = 0);
  c.def("flow_unipc",
        [](nb::handle x_h, nb::handle v_h, nb::handle out_h, nb::handle xl_h, nb::handle m1_h, nb::handle m2_h,
           nb::handle coeffs_h, int64_t frame_axis, bool official_df_aliasing, uintptr_t stream) {
          require_cuda("cuda.flow_unipc");
          const char* fn = "cuda.flow_unipc";
          const Buffer &x = as_buffer(x_h, fn, "x"), &v = as_buffer(v_h, fn, "v"), &out = as_buffer(out_h, fn, "out"),
                       &xl = as_buffer(xl_h, fn, "x_last"), &m1 = as_buffer(m1_h, fn, "m1"),
                       &m2 = as_buffer(m2_h, fn, "m2"), &coeffs = as_buffer(coeffs_h, fn, "coeffs");
          expect(x, fn, "x");
          expect_like(v, x, fn, "v", "x");
          expect_like(out, x, fn, "out", "x");
          expect_like(xl, x, fn, "x_last", "x");
          expect_like(m1, x, fn, "m1", "x");
          expect_like(m2, x, fn, "m2", "x");
          const Layout l = buffer_layout(x, frame_axis, fn);
          expect_per_frame(coeffs, l.frames, skyrt::kUniPCCoeffs, skyrt::kFloat32, x, fn, "coeffs");
          check_status(skyrt::cuda::flow_unipc(static_cast<const float*>(x.ptr), static_cast<const float*>(v.ptr),
                                               static_cast<float*>(out.ptr), static_cast<float*>(xl.ptr),
                                               static_cast<float*>(m1.ptr), static_cast<float*>(m2.ptr),
                                               static_cast<const skyrt::UniPCFrameCoeffs*>(coeffs.ptr), l.outer,
                                               l.frames, l.inner, official_df_aliasing, stream_of(stream)),
                       fn);
        },
        "x"_a, "v"_a, "out"_a, "x_last"_a, "m1"_a, "m2"_a, "coeffs"_a, "frame_axis"_a = 1,
        "official_df_aliasing"_a = false, "stream"_a = 0, "coeffs: a device copy of unipc_frame_coeffs(...).");
  c.def("flow_fewstep",
        [](nb::handle x_h, nb::handle v_h, nb::handle noise_h, nb::handle out_h, float sigma, float next_sigma,
           uintptr_t stream) {
          require_cuda("cuda.flow_fewstep");
          const char* fn = "cuda.flow_fewstep";
          const Buffer &x = as_buffer(x_h, fn, "x"), &v = as_buffer(v_h, fn, "v"), &out = as_buffer(out_h, fn, "out");
          expect(x, fn, "x");
          expect_like(v, x, fn, "v", "x");
          expect_like(out, x, fn, "out", "x");
          const float* noise = nullptr;
          if (!noise_h.is_none()) {
            const Buffer& n = as_buffer(noise_h, fn, "noise");
            expect_like(n, x, fn, "noise", "x");
            noise = static_cast<const float*>(n.ptr);
          }
          check_status(skyrt::cuda::flow_fewstep(static_cast<const float*>(x.ptr), static_cast<const float*>(v.ptr),
                                                 noise, static_cast<float*>(out.ptr), x.numel(), sigma, next_sigma,
                                                 stream_of(stream)),
                       fn);
        },
        "x"_a, "v"_a, "noise"_a, "out"_a, "sigma"_a, "next_sigma"_a = 0.0f, "stream"_a = 0);
  c.def("addnoise_condition",
        [](nb::handle x_h, nb::handle noise_h, nb::handle out_h, double factor, int64_t frame_begin, int64_t frame_end,
           int64_t frame_axis, uintptr_t stream) {
          const char* fn = "cuda.addnoise_condition";
          const auto [x, noise, out] = elementwise_buffers(fn, x_h, "x", noise_h, "noise", out_h);
          const Layout l = buffer_layout(*x, frame_axis, fn);
          check_status(skyrt::cuda::addnoise_condition(static_cast<const float*>(x->ptr),
                                                       static_cast<const float*>(noise->ptr), static_cast<float*>(out->ptr),
                                                       l.outer, l.frames, l.inner, frame_begin, frame_end, factor,
                                                       stream_of(stream)),
                       fn);
        },
        "x"_a, "noise"_a, "out"_a, "factor"_a, "frame_begin"_a, "frame_end"_a, "frame_axis"_a = 1, "stream"_a = 0);
}

// ---- the rollout core ------------------------------------------------------------------------------

// Python's handle on a RolloutCore: close() releases every buffer at once (deterministically).
class PyRollout {
 public:
  explicit PyRollout(skyrt::RolloutConfig cfg) : core_(std::make_unique<skyrt::RolloutCore>(std::move(cfg))) {}
  skyrt::RolloutCore& get() const {
    if (!core_) throw std::runtime_error("this rollout core is closed (its buffers are released)");
    return *core_;
  }
  void close() { core_.reset(); }
  bool closed() const { return !core_; }

 private:
  std::unique_ptr<skyrt::RolloutCore> core_;
};

void expect_block(const CpuConstArray& a, const skyrt::RolloutCore& core, const char* fn, const char* name) {
  const auto& c = core.config();
  const size_t n = static_cast<size_t>(c.channels * c.block_frames * c.height * c.width);
  require(a.size() == n, std::string(fn) + ": " + name + " must be float32 [" + std::to_string(c.channels) + ", " +
                             std::to_string(c.block_frames) + ", " + std::to_string(c.height) + ", " +
                             std::to_string(c.width) + "] (" + std::to_string(n) + " elements), got " +
                             std::to_string(a.size()));
}

void expect_window(const CpuConstArray& a, const skyrt::RolloutCore& core, int64_t frames, const char* fn,
                   const char* name) {
  const auto& c = core.config();
  require(c.recompute, std::string(fn) + " is window mode's: make the core with RolloutCore.window(...)");
  const size_t n = static_cast<size_t>(c.channels * frames * c.height * c.width);
  require(a.ndim() == 4 && a.size() == n,
          std::string(fn) + ": " + name + " must be float32 [" + std::to_string(c.channels) + ", " +
              std::to_string(frames) + ", " + std::to_string(c.height) + ", " + std::to_string(c.width) + "], got " +
              std::to_string(a.size()) + " elements");
}

// export_state / import_state: {name: numpy array} <-> skyrt::RolloutState (csrc/rollout_state.h).
nb::dict export_state_dict(const skyrt::RolloutCore& core) {
  skyrt::RolloutState state;
  {
    nb::gil_scoped_release release;
    state = core.export_state();
  }
  nb::module_ np = nb::module_::import_("numpy");
  nb::dict out;
  for (const skyrt::StateArray& a : state.arrays) {
    nb::bytes raw(reinterpret_cast<const char*>(a.bytes.data()), a.bytes.size());
    nb::object array = np.attr("frombuffer")(raw, "dtype"_a = a.dtype).attr("reshape")(nb::cast(a.shape));
    out[a.name.c_str()] = array.attr("copy")();
  }
  return out;
}

void import_state_dict(skyrt::RolloutCore& core, nb::dict arrays) {
  nb::module_ np = nb::module_::import_("numpy");
  skyrt::RolloutState state;
  for (auto [key, value] : arrays) {
    skyrt::StateArray a;
    a.name = nb::cast<std::string>(key);
    nb::object array = np.attr("ascontiguousarray")(value);
    a.dtype = nb::cast<std::string>(array.attr("dtype").attr("name"));
    for (nb::handle d : array.attr("shape")) a.shape.push_back(nb::cast<int64_t>(d));
    nb::bytes raw(array.attr("tobytes")());
    const auto* p = reinterpret_cast<const uint8_t*>(raw.c_str());
    a.bytes.assign(p, p + raw.size());
    state.arrays.push_back(std::move(a));
  }
  std::string why;
  int status;
  {
    nb::gil_scoped_release release;
    status = core.import_state(state, &why);
  }
  require(status == skyrt::kOk, "RolloutCore.import_state: " + why);
}

// RolloutCore.window(...): the window-mode configuration (no ring: one sink-less slot, no K/V).
PyRollout* make_window_core(std::vector<int64_t> step_template, std::vector<double> sigmas, const std::string& sampler,
                            bool official_df_aliasing, int64_t ar_step, int64_t block_frames, int64_t prefix_blocks,
                            int64_t window_blocks, int64_t end_blocks, double addnoise_condition, int64_t channels,
                            int64_t height, int64_t width, int64_t contexts, float guidance_scale,
                            const std::string& device, uintptr_t stream) {
  skyrt::RolloutConfig c;
  c.step_template = std::move(step_template);
  c.sigmas = std::move(sigmas);
  c.sampler = sampler;
  c.official_df_aliasing = official_df_aliasing;
  c.ar_step = ar_step;
  c.block_frames = block_frames;
  c.prefix_blocks = prefix_blocks;
  c.max_blocks_in_flight = c.horizon_blocks = window_blocks;
  c.sink_blocks = 0;
  c.window_blocks = 1;
  c.channels = channels;
  c.height = height;
  c.width = width;
  c.contexts = contexts;
  c.guidance_scale = guidance_scale;
  c.device = device_of(device);
  c.stream = stream_of(stream);
  c.recompute = true;
  c.end_blocks = end_blocks;
  c.addnoise_condition = addnoise_condition;
  std::string why;
  if (skyrt::rollout_check(c, &why) != skyrt::kOk) throw std::invalid_argument("RolloutCore.window: " + why);
#ifndef SKYRT_WITH_CUDA
  require(!c.device.cuda, "RolloutCore.window on " + device + ": " + skyrt::status_message(skyrt::kNotCompiled));
#endif
  return new PyRollout(std::move(c));
}

void bind_rollout(nb::module_& m) {
  nb::class_<skyrt::RowPlan>(m, "RowPlan", "What one schedule row does (see rollout.h).")
      .def_ro("row", &skyrt::RowPlan::row)
      .def_ro("active", &skyrt::RowPlan::active, "blocks the DiT sees this row, in order")
      .def_ro("timesteps", &skyrt::RowPlan::timesteps, "[active] timestep of each active block")
      .def_prop_ro("update", [](const skyrt::RowPlan& p) { return std::vector<bool>(p.update.begin(), p.update.end()); },
                   "[active] its sampler steps after this row")
      .def_ro("started", &skyrt::RowPlan::started, "active blocks new this row: start_block(b, noise) each, in order")
      .def_ro("step_noise", &skyrt::RowPlan::step_noise,
              "updated blocks whose sampler step takes fresh noise: set_step_noise(b, noise) each, in order, "
              "before apply_velocity")
      .def_ro("finished", &skyrt::RowPlan::finished, "blocks whose last update is this row");

  nb::class_<skyrt::RecachePlan>(m, "RecachePlan", "LongLive's recache chunk (RolloutCore.pack_recache).")
      .def_ro("blocks", &skyrt::RecachePlan::blocks, "the chunk's blocks in order (empty: nothing to recache)")
      .def_prop_ro("slot_valid", [](const skyrt::RecachePlan& p) { return vector_array<bool>(p.slot_valid); }, kMove,
                   "bool [slots]: ring slots the chunk attends to besides itself")
      .def_ro("position", &skyrt::RecachePlan::position, "RoPE position of the chunk's first frame")
      .def_ro("frames", &skyrt::RecachePlan::frames, "latent frames of the chunk: one full-attention block");

  using R = PyRollout;
  auto rel = nb::call_guard<nb::gil_scoped_release>();
  nb::class_<R>(m, "RolloutCore",
                "One stream's rollout state (latents in flight, sampler history, ring KV cache, DiT I/O buffers) on\n"
                "one device, allocated once; driven per schedule row (csrc/rollout.h). close() releases it.")
      .def("__init__",
           [](R* self, std::vector<int64_t> step_template, std::vector<double> sigmas, const std::string& sampler,
              std::vector<double> step_timesteps, std::vector<double> renoise_sigmas, double commit_timestep,
              bool longlive_recache, bool official_df_aliasing, int64_t ar_step, int64_t causal_block_size,
              int64_t prefix_blocks,
              int64_t max_blocks_in_flight, int64_t horizon_blocks, int64_t sink_blocks, int64_t window_blocks,
              int64_t channels, int64_t height, int64_t width, int64_t tokens_per_frame, int64_t layers, int64_t heads,
              int64_t head_dim, int64_t contexts, const std::string& kv_dtype, float guidance_scale, double rope_theta,
              const std::string& device, uintptr_t stream) {
             skyrt::RolloutConfig c;
             c.step_template = std::move(step_template);
             c.sigmas = std::move(sigmas);
             c.sampler = sampler;
             c.step_timesteps = std::move(step_timesteps);
             c.renoise_sigmas = std::move(renoise_sigmas);
             c.commit_timestep = commit_timestep;
             c.longlive_recache = longlive_recache;
             c.official_df_aliasing = official_df_aliasing;
             c.ar_step = ar_step;
             c.block_frames = causal_block_size;
             c.prefix_blocks = prefix_blocks;
             c.max_blocks_in_flight = max_blocks_in_flight;
             c.horizon_blocks = horizon_blocks;
             c.sink_blocks = sink_blocks;
             c.window_blocks = window_blocks;
             c.channels = channels;
             c.height = height;
             c.width = width;
             c.tokens_per_frame = tokens_per_frame;
             c.layers = layers;
             c.heads = heads;
             c.head_dim = head_dim;
             c.contexts = contexts;
             c.kv_dtype = dtype_of(kv_dtype);
             c.guidance_scale = guidance_scale;
             c.rope_theta = rope_theta;
             c.device = device_of(device);
             c.stream = stream_of(stream);
             std::string why;
             if (skyrt::rollout_check(c, &why) != skyrt::kOk) throw std::invalid_argument("RolloutCore: " + why);
#ifndef SKYRT_WITH_CUDA
             require(!c.device.cuda, std::string("RolloutCore on ") + device + ": " +
                                         skyrt::status_message(skyrt::kNotCompiled));
#endif
             new (self) R(std::move(c));
           },
           "step_template"_a, "sigmas"_a, "sampler"_a = "unipc", "step_timesteps"_a = std::vector<double>{},
           "renoise_sigmas"_a = std::vector<double>{}, "commit_timestep"_a = 0.0, "longlive_recache"_a = false,
           "official_df_aliasing"_a = true, "ar_step"_a = 0, "causal_block_size"_a = 1, "prefix_blocks"_a = 0, "max_blocks_in_flight"_a = 1, "horizon_blocks"_a = -1,
           "sink_blocks"_a = 1, "window_blocks"_a = 8, "channels"_a = 16, "height"_a, "width"_a, "tokens_per_frame"_a,
           "layers"_a, "heads"_a, "head_dim"_a, "contexts"_a = 1, "kv_dtype"_a = "float32", "guidance_scale"_a = 1.0f,
           "rope_theta"_a = 10000.0, "device"_a = "cpu", "stream"_a = 0)
      .def_static("window", &make_window_core, "step_template"_a, "sigmas"_a, "sampler"_a = "unipc",
                  "official_df_aliasing"_a = true, "ar_step"_a = 0, "causal_block_size"_a = 1, "prefix_blocks"_a = 0,
                  "window_blocks"_a, "end_blocks"_a = 0, "addnoise_condition"_a = 0.0, "channels"_a = 16, "height"_a,
                  "width"_a, "contexts"_a = 1, "guidance_scale"_a = 1.0f, "device"_a = "cpu", "stream"_a = 0,
                  "A window-mode core (csrc/rollout.h, recompute): one window of `window_blocks` blocks, the first\n"
                  "`prefix_blocks` clean conditioning, the last `end_blocks` pinned; every frame is recomputed each\n"
                  "row, no ring. Drive it with load_window, next_row, pack_window, apply_velocity, read_window.")
      .def("load_window",
           [](R& r, CpuConstArray z) {
             expect_window(z, r.get(), r.get().window_frames(), "load_window", "z");
             r.get().load_window(z.data());
           },
           "z"_a, "The window's initial latents [C, F, h, w]: noise, with prefix and end latents in place.")
      .def("set_condition_noise",
           [](R& r, CpuConstArray noise) {
             expect_window(noise, r.get(), r.get().config().prefix_blocks * r.get().config().block_frames,
                           "set_condition_noise", "noise");
             r.get().set_condition_noise(noise.data());
           },
           "noise"_a, "addnoise_condition's noise of the prefix frames [C, P, h, w], used by every later pack.")
      .def("pack_window", [](R& r) { return r.get().pack_window(); }, rel,
           "Every frame of the window -> latents_in (the prefix noised); returns F.")
      .def_prop_ro("window_timesteps", [](R& r) { return vector_array(r.get().window_timesteps()); }, kMove,
                   "float32 [F]: the timestep of each frame of the last pack_window")
      .def("read_window",
           [](R& r) {
             const auto& c = r.get().config();
             const int64_t F = r.get().window_frames();
             std::vector<float> out(static_cast<size_t>(c.channels * F * c.height * c.width));
             r.get().read_window(out.data());
             return to_numpy(std::move(out), {static_cast<size_t>(c.channels), static_cast<size_t>(F),
                                              static_cast<size_t>(c.height), static_cast<size_t>(c.width)});
           },
           kMove, "The window's latents now [C, F, h, w] (host).")
      .def("close", &R::close, "Release every buffer now (later calls raise).")
      .def_prop_ro("closed", &R::closed)
      .def("next_row",
           [](R& r) -> nb::object {
             skyrt::RowPlan plan;
             if (!r.get().next_row(&plan)) return nb::none();
             return nb::cast(std::move(plan));
           },
           "The next row's plan, or None once a finite horizon is done.")
      .def("start_block",
           [](R& r, int64_t block, CpuConstArray noise) {
             expect_block(noise, r.get(), "start_block", "noise");
             r.get().start_block(block, noise.data());
           },
           "block"_a, "noise"_a)
      .def("set_step_noise",
           [](R& r, int64_t block, CpuConstArray noise) {
             expect_block(noise, r.get(), "set_step_noise", "noise");
             r.get().set_step_noise(block, noise.data());
           },
           "block"_a, "noise"_a, "Fresh noise [C, b, h, w] for the coming step of a block of plan.step_noise.")
      .def("pack_active", [](R& r) { return r.get().pack_active(); }, rel, "Active latents -> latents_in; returns F.")
      .def("apply_velocity", [](R& r) { r.get().apply_velocity(); }, rel,
           "CFG combine of velocity, then each updated block's sampler step.")
      .def("next_slot", [](R& r) { return r.get().next_slot(); })
      .def("finish_block", [](R& r, int64_t b) { r.get().finish_block(b); }, rel, "block"_a)
      .def("load_commit_input",
           [](R& r, CpuConstArray x, std::optional<CpuConstArray> noise, double factor) {
             expect_block(x, r.get(), "load_commit_input", "x");
             if (noise) expect_block(*noise, r.get(), "load_commit_input", "noise");
             r.get().load_commit_input(x.data(), noise ? noise->data() : nullptr, factor);
           },
           "x"_a, "noise"_a = nb::none(), "factor"_a = 0.0)
      .def("pack_store", [](R& r, int64_t slot) { r.get().pack_store(slot); }, rel, "slot"_a)
      .def("commit", [](R& r, int64_t block, double t) { return r.get().commit(block, t); }, rel, "block"_a,
           "t_commit"_a)
      .def("write_kv", [](R& r, int64_t slot, int64_t index) { r.get().write_kv(slot, index); }, rel, "slot"_a,
           "index"_a = 0, "new_k / new_v of block `index` of the last step's frames -> ring slot `slot`.")
      .def("pack_recache", [](R& r) { return r.get().pack_recache(); }, rel,
           "LongLive's recache chunk before the next block: its committed inputs -> latents_in; the plan.")
      .def("write_recache", [](R& r) { r.get().write_recache(); }, rel,
           "After pack_recache's DiT step: the new K/V of the chunk's blocks still in the ring -> their slots.")
      .def("rebase", [](R& r, int64_t shift) { r.get().rebase(shift); }, rel, "shift"_a)
      .def("read_store",
           [](R& r, int64_t slot) {
             const auto& c = r.get().config();
             std::vector<float> out(static_cast<size_t>(c.channels * c.block_frames * c.height * c.width));
             r.get().read_store(slot, out.data());
             return to_numpy(std::move(out), {static_cast<size_t>(c.channels), static_cast<size_t>(c.block_frames),
                                              static_cast<size_t>(c.height), static_cast<size_t>(c.width)});
           },
           kMove, "slot"_a, "The committed input of `slot` as a host array [C, b, h, w].")
      .def("committed_timestep", [](R& r, int64_t s) { return r.get().committed_timestep(s); }, "slot"_a)
      .def("committed_block", [](R& r, int64_t s) { return r.get().committed_block(s); }, "slot"_a)
      .def("buffer",
           [](R& r, const std::string& name, std::optional<int64_t> frames) {
             auto& core = r.get();
             Buffer b = core.buffer(name, frames.value_or(core.frames()));
             return b;
           },
           "name"_a, "frames"_a = nb::none(),
           "A DiT I/O buffer shaped for `frames` frames (default: the last pack): latents_in, velocity, new_k, new_v, "
           "cache_k, cache_v. Non-owning: valid until close().")
      .def_prop_ro("buffer_names", [](R& r) { return r.get().buffer_names(); })
      .def_prop_ro("frames", [](R& r) { return r.get().frames(); })
      .def_prop_ro("max_frames", [](R& r) { return r.get().max_frames(); })
      .def_prop_ro("in_flight", [](R& r) { return r.get().in_flight(); })
      .def("steps_taken", [](R& r, int64_t b) { return r.get().steps_taken(b); }, "block"_a,
           "Sampler steps block `block` (in flight) has taken.")
      .def_prop_ro("device", [](R& r) { return r.get().config().device.str(); })
      .def_prop_ro("contexts", [](R& r) { return r.get().config().contexts; })
      .def_prop_ro("sampler", [](R& r) { return r.get().config().sampler; })
      .def_prop_ro("commit_timestep", [](R& r) { return r.get().config().commit_timestep; },
                   "the timestep of the clean pass that commits a block")
      .def_prop_ro("rows", [](R& r) { return r.get().schedule().rows(); })
      .def_prop_ro("num_steps", [](R& r) { return r.get().schedule().num_steps(); })
      .def_prop_ro("capacity", [](R& r) { return r.get().ring().capacity(); })
      .def_prop_ro("origin", [](R& r) { return r.get().ring().origin(); })
      .def("position_of", [](R& r, int64_t b) { return r.get().ring().position_of(b); }, "block"_a)
      .def_prop_ro("valid",
                   [](R& r) {
                     const auto& sb = r.get().ring().slot_block();
                     std::vector<uint8_t> v(sb.size());
                     for (size_t i = 0; i < v.size(); ++i) v[i] = sb[i] >= 0;
                     return vector_array<bool>(v);
                   },
                   kMove, "bool [capacity]: slot holds a committed block")
      .def_prop_ro("slot_block", [](R& r) { return vector_array(r.get().ring().slot_block()); }, kMove)
      .def("export_state", [](R& r) { return export_state_dict(r.get()); },
           "The whole stream state between rows (csrc/rollout_state.h) as {name: numpy array} (host copies).")
      .def("import_state", [](R& r, nb::dict arrays) { import_state_dict(r.get(), arrays); }, "arrays"_a,
           "Put an export_state() dict back (between rows). A state of another configuration, version or shape is\n"
           "a ValueError naming what differs, and leaves the core unchanged.");
}

// Rolling-Forcing's cache policy (csrc/rolling_cache.h): the views of a window call and of a commit.
void bind_rolling_cache(nb::module_& m) {
  nb::class_<skyrt::RollingView>(m, "RollingView", "What one DiT call of the rolling cache sees.")
      .def_prop_ro("slot_valid", [](const skyrt::RollingView& v) { return vector_array<bool>(v.slot_valid); }, kMove,
                   "bool [slots]: ring slots the call attends to besides its own frames")
      .def_ro("attention_frames", &skyrt::RollingView::attention_frames,
              "the attention block among the step's frames (the whole step: full attention)")
      .def_ro("sink_position", &skyrt::RollingView::sink_position, "RoPE position of the sink's first frame")
      .def_ro("sink_visible", &skyrt::RollingView::sink_visible);
  nb::class_<skyrt::RollingCache>(m, "RollingCache",
                                  "Rolling-Forcing's cache policy over a rollout core's ring (csrc/rolling_cache.h).")
      .def("__init__",
           [](skyrt::RollingCache* self, PyRollout& core, int64_t attention_frames, int64_t cache_frames) {
             new (self) skyrt::RollingCache(core.get().config(), {attention_frames, cache_frames});
           },
           "core"_a, "attention_frames"_a = 21, "cache_frames"_a = 24)
      .def("window", [](skyrt::RollingCache& c, PyRollout& r, int64_t first, int64_t count) {
             return c.window(r.get(), first, count); },
           "core"_a, "first"_a, "count"_a, "The window call of `count` active blocks from `first` (places the sink).")
      .def("commit", [](skyrt::RollingCache& c, PyRollout& r, int64_t block) { return c.commit(r.get(), block); },
           "core"_a, "block"_a, "The clean pass that commits `block`, before core.commit (places the sink).")
      .def_prop_ro("attention_blocks", &skyrt::RollingCache::attention_blocks)
      .def_prop_ro("cache_blocks", &skyrt::RollingCache::cache_blocks)
      .def_prop_ro("sink_frame", &skyrt::RollingCache::sink_frame, "absolute frame the sink's keys sit at now")
      .def("restore_sink_frame", &skyrt::RollingCache::restore_sink_frame, "frame"_a,
           "A resumed stream's: where its sink's keys sat when its core's state was exported (nothing is rotated).");
}

nb::dict build_info() {
  nb::dict info;
#ifdef SKYRT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["version"] = "0.1.0";
  return info;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "skyrt core: diffusion-forcing schedule, KV cache and samplers (CPU references; CUDA when built)";
  m.def("build_info", &build_info, "What this build contains: {'cuda': bool, 'version': str}.");
  m.def("cfg_combine", &cfg_combine_binding, "cond"_a, "uncond"_a, "out"_a, "scale"_a,
        "out = uncond + scale * (cond - uncond), float32, C-contiguous, CPU reference.");
  bind_schedule(m);
  bind_kv_cache(m);
  bind_samplers(m);
  bind_buffer(m);
  bind_cuda(m);
  bind_rollout(m);
  bind_rolling_cache(m);
}

// module.cpp — the nanobind binding layer of skyrt._core. Only this file sees arrays: it checks
// shapes and dtypes, hands raw pointers to the kernels and turns status codes into exceptions.
//
// CPU entry points take numpy arrays. The CUDA entry points live in the submodule `_core.cuda`,
// have the same names and take raw device pointers as integers (e.g. torch's tensor.data_ptr()),
// element counts/strides and a stream handle as an integer (0 = default stream); in a build
// without CUDA they raise RuntimeError. Build: `pip install --no-build-isolation -e .`.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "df_schedule.h"
#include "guidance.h"
#include "half.h"
#include "kv_cache.h"
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
  skyrt::DFScheduleConfig cfg;
  cfg.step_template = std::move(step_template);
  cfg.ar_step = ar_step;
  cfg.causal_block_size = causal_block_size;
  cfg.num_prefix_blocks = num_prefix_blocks;
  cfg.max_blocks_in_flight = max_blocks_in_flight;
  cfg.horizon_blocks = horizon_blocks;
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
      .def("__repr__", [](const skyrt::DFStep& s) {
        return "DFStep(row=" + std::to_string(s.row) + ", first=" + std::to_string(s.first) +
               ", last=" + std::to_string(s.last) + ")";
      });

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
      .def("__repr__", [](const skyrt::KVAppend& a) {
        return "KVAppend(slot=" + std::to_string(a.slot) + ", evicted_block=" + std::to_string(a.evicted_block) +
               ", position=" + std::to_string(a.position) + ")";
      });

  nb::class_<skyrt::KVRing>(
      m, "KVRing",
      "Slot bookkeeping of the ring KV cache: sink slots keep the first blocks, window slots form a ring.\n"
      "Block b's keys are stored rotated at position b * frames_per_block - origin.")
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
                        CpuConstArray coeffs, int64_t frame_axis) {
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
                                               table, l.outer, l.frames, l.inner);
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
        "frame_axis"_a = 1,
        "One per-frame FlowUniPC step: out = next sample; x_last, m1, m2 (the frame's history, same shape as x) "
        "are updated in place. out may be x.");
  m.def("addnoise_condition", &addnoise_condition_binding, "x"_a, "noise"_a, "out"_a, "factor"_a,
        "frame_begin"_a, "frame_end"_a, "frame_axis"_a = 1,
        "out = x * (1 - factor) + noise * factor on frames [frame_begin, frame_end), copy elsewhere.");
}

// ---- CUDA entry points (raw device pointers) -------------------------------------------------------

void* stream_of(uintptr_t s) { return reinterpret_cast<void*>(s); }

bool half_dtype(const std::string& dtype, const char* what) {
  require(dtype == "float32" || dtype == "float16", std::string(what) + ": dtype must be 'float32' or 'float16'");
  return dtype == "float16";
}

void bind_cuda(nb::module_& m) {
  nb::module_ c = m.def_submodule(
      "cuda", "CUDA kernels on raw device pointers (ints) with a stream (int, 0 = default); same names as the "
              "CPU references. Raise RuntimeError when this build has no CUDA.");
  c.def("available", []() {
#ifdef SKYRT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  c.def("cfg_combine",
        [](uintptr_t cond, uintptr_t uncond, uintptr_t out, size_t n, float scale, uintptr_t stream) {
          check_status(skyrt::cuda::cfg_combine(static_cast<const float*>(as_ptr(cond)),
                                                static_cast<const float*>(as_ptr(uncond)),
                                                static_cast<float*>(as_ptr(out)), n, scale, stream_of(stream)),
                       "cuda.cfg_combine");
        },
        "cond"_a, "uncond"_a, "out"_a, "n"_a, "scale"_a, "stream"_a = 0);
  c.def("kv_write_block",
        [](uintptr_t src, int64_t src_layer_stride, uintptr_t cache, int64_t cache_layer_stride,
           int64_t cache_slot_stride, int64_t slot, int64_t layers, int64_t block_elems, const std::string& dtype,
           uintptr_t stream) {
          int st;
          if (half_dtype(dtype, "cuda.kv_write_block"))
            st = skyrt::cuda::kv_write_block(static_cast<const skyrt::f16*>(as_ptr(src)), src_layer_stride,
                                             static_cast<skyrt::f16*>(as_ptr(cache)), cache_layer_stride,
                                             cache_slot_stride, slot, layers, block_elems, stream_of(stream));
          else
            st = skyrt::cuda::kv_write_block(static_cast<const float*>(as_ptr(src)), src_layer_stride,
                                             static_cast<float*>(as_ptr(cache)), cache_layer_stride,
                                             cache_slot_stride, slot, layers, block_elems, stream_of(stream));
          check_status(st, "cuda.kv_write_block");
        },
        "src"_a, "src_layer_stride"_a, "cache"_a, "cache_layer_stride"_a, "cache_slot_stride"_a, "slot"_a,
        "layers"_a, "block_elems"_a, "dtype"_a = "float32", "stream"_a = 0, "Strides in elements.");
  c.def("kv_rope_rebase",
        [](uintptr_t keys, int64_t layers, int64_t slots, int64_t tokens, int64_t heads, int64_t head_dim,
           int64_t layer_stride, int64_t slot_stride, int64_t token_stride, int64_t head_stride, int64_t shift,
           double theta, const std::string& dtype, uintptr_t stream) {
          int st;
          if (half_dtype(dtype, "cuda.kv_rope_rebase"))
            st = skyrt::cuda::kv_rope_rebase(static_cast<skyrt::f16*>(as_ptr(keys)), layers, slots, tokens, heads,
                                             head_dim, layer_stride, slot_stride, token_stride, head_stride, shift,
                                             theta, stream_of(stream));
          else
            st = skyrt::cuda::kv_rope_rebase(static_cast<float*>(as_ptr(keys)), layers, slots, tokens, heads,
                                             head_dim, layer_stride, slot_stride, token_stride, head_stride, shift,
                                             theta, stream_of(stream));
          check_status(st, "cuda.kv_rope_rebase");
        },
        "keys"_a, "layers"_a, "slots"_a, "tokens"_a, "heads"_a, "head_dim"_a, "layer_stride"_a, "slot_stride"_a,
        "token_stride"_a, "head_stride"_a, "shift"_a, "theta"_a = 10000.0, "dtype"_a = "float32", "stream"_a = 0,
        "Strides in elements; head_dim contiguous.");
  c.def("flow_euler",
        [](uintptr_t x, uintptr_t v, uintptr_t out, uintptr_t dt, uintptr_t update, int64_t outer, int64_t frames,
           int64_t inner, uintptr_t stream) {
          check_status(skyrt::cuda::flow_euler(static_cast<const float*>(as_ptr(x)),
                                               static_cast<const float*>(as_ptr(v)), static_cast<float*>(as_ptr(out)),
                                               static_cast<const float*>(as_ptr(dt)),
                                               static_cast<const uint8_t*>(as_ptr(update)), outer, frames, inner,
                                               stream_of(stream)),
                       "cuda.flow_euler");
        },
        "x"_a, "v"_a, "out"_a, "dt"_a, "update"_a, "outer"_a, "frames"_a, "inner"_a, "stream"_a = 0,
        "update = 0 means every frame updates.");
  c.def("flow_unipc",
        [](uintptr_t x, uintptr_t v, uintptr_t out, uintptr_t x_last, uintptr_t m1, uintptr_t m2, uintptr_t coeffs,
           int64_t outer, int64_t frames, int64_t inner, uintptr_t stream) {
          check_status(skyrt::cuda::flow_unipc(static_cast<const float*>(as_ptr(x)),
                                               static_cast<const float*>(as_ptr(v)), static_cast<float*>(as_ptr(out)),
                                               static_cast<float*>(as_ptr(x_last)),
                                               static_cast<float*>(as_ptr(m1)), static_cast<float*>(as_ptr(m2)),
                                               static_cast<const skyrt::UniPCFrameCoeffs*>(as_ptr(coeffs)), outer,
                                               frames, inner, stream_of(stream)),
                       "cuda.flow_unipc");
        },
        "x"_a, "v"_a, "out"_a, "x_last"_a, "m1"_a, "m2"_a, "coeffs"_a, "outer"_a, "frames"_a, "inner"_a,
        "stream"_a = 0, "coeffs: device copy of unipc_frame_coeffs(...) (float32 [frames, 12]).");
  c.def("addnoise_condition",
        [](uintptr_t x, uintptr_t noise, uintptr_t out, int64_t outer, int64_t frames, int64_t inner,
           int64_t frame_begin, int64_t frame_end, double factor, uintptr_t stream) {
          check_status(skyrt::cuda::addnoise_condition(static_cast<const float*>(as_ptr(x)),
                                                       static_cast<const float*>(as_ptr(noise)),
                                                       static_cast<float*>(as_ptr(out)), outer, frames, inner,
                                                       frame_begin, frame_end, factor, stream_of(stream)),
                       "cuda.addnoise_condition");
        },
        "x"_a, "noise"_a, "out"_a, "outer"_a, "frames"_a, "inner"_a, "frame_begin"_a, "frame_end"_a, "factor"_a,
        "stream"_a = 0);
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
  bind_cuda(m);
}

// rollout_state.h — a rollout core's whole stream state as named host arrays, and back.
//
// What a resumed stream needs to continue exactly where it stopped, taken between schedule rows
// (after a row's commits, before the next next_row; never between pack_recache and write_recache):
//   * the DF schedule's position (live blocks' template indices, the terminal flag, the row count),
//   * the ring's bookkeeping (blocks appended, RoPE origin, last block, each slot's block and position),
//   * each in-flight slot: its block, sampler steps taken, latents, sampler history (UniPC's x_last and
//     two x0 predictions), step noise,
//   * the ring K/V of every prompt context (cache_k / cache_v, in the core's kv dtype, keys stored
//     rotated at their positions relative to the origin), the committed inputs (store) with their
//     timesteps and blocks, LongLive's kept-aside input, the active blocks of the last row,
//   * window mode's staging window, condition noise and timesteps.
// The DiT I/O buffers (latents_in, velocity, new_k, new_v) and the scratch block are not state: every
// row writes them before it reads them.
// The configuration travels too ("config_int", "config_float"): import refuses a state whose
// configuration differs from the core's, naming the field, and any array whose dtype or shape is not
// the core's. Export and import copy through host memory, so a GPU core's state goes through the same
// code (copy_bytes picks cudaMemcpy); the CPU reference is what CI runs.
// kRolloutStateVersion changes whenever an array is added, removed or changes meaning.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "rollout.h"

namespace skyrt {

constexpr int64_t kRolloutStateVersion = 1;

// One named host array, C order. dtype: "float32", "float16", "float64", "int64".
struct StateArray {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
  int64_t numel() const;
};

struct RolloutState {
  std::vector<StateArray> arrays;
  const StateArray* find(const std::string& name) const;  // nullptr if absent
};

// RolloutCore::export_state() / import_state() (declared in rollout.h, defined in rollout_state.cpp):
// export_state: the core's state now (throws std::runtime_error if a copy from its device fails);
// import_state: kOk, or kInvalidArgument with a reason naming the array or setting that does not fit
// the core. On an error the core is left as it was (everything is checked before anything is written).

}  // namespace skyrt

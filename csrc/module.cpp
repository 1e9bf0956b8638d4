// module.cpp — the nanobind binding layer of skyrt._core. Only this file sees arrays: it checks
// shapes and dtypes, hands raw pointers to the kernels and turns status codes into exceptions.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <stdexcept>
#include <string>

#include "guidance.h"

namespace nb = nanobind;

namespace {

using CpuArray = nb::ndarray<float, nb::device::cpu, nb::c_contig>;

void check_status(int status, const char* what) {
  if (status != skyrt::kOk) throw std::runtime_error(std::string(what) + ": " + skyrt::status_message(status));
}

void cfg_combine_binding(CpuArray cond, CpuArray uncond, CpuArray out, float scale) {
  if (cond.size() != uncond.size() || cond.size() != out.size())
    throw std::invalid_argument("cfg_combine: cond, uncond and out must have the same number of elements");
  check_status(skyrt::cpu::cfg_combine(cond.data(), uncond.data(), out.data(), cond.size(), scale), "cfg_combine");
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
  m.def("cfg_combine", &cfg_combine_binding, nb::arg("cond"), nb::arg("uncond"), nb::arg("out"), nb::arg("scale"),
        "out = uncond + scale * (cond - uncond), float32, C-contiguous, CPU reference.");
}

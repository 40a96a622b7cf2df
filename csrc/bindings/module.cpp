// The pybind11 module mmfree_ext._C. Importing it runs the STABLE_TORCH_LIBRARY
// registrations of every ops_*.cpp in this library (the torch.ops.mmfree.* schemas and
// their CPU kernels; the CUDA kernels live in the companion library _C_cuda, which
// mmfree_ext loads where torch has CUDA) and installs torch's thread pool as the CPU
// kernels' parallel backend. The module itself exposes only build and CPU information:
// ops are reached through torch.ops, never through pybind11 tensor functions, so that
// torch.compile and autograd see them. It uses torch only through the stable ABI.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/torch_stable.h"
#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "mmfree_build_config.h"

namespace py = pybind11;

namespace {

void torch_parallel_backend(int64_t begin, int64_t end, int64_t grain, mmfree::cpu::RangeFn fn, void* ctx) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int torch_thread_count() { return static_cast<int>(torch::stable::get_num_threads()); }

py::dict build_info() {
  py::dict d;
  d["torch_version"] = MMFREE_BUILD_TORCH_VERSION;
  d["torch_cuda"] = MMFREE_BUILD_TORCH_CUDA;
  d["torch_target_version"] = MMFREE_TORCH_TARGET;
#if defined(MMFREE_BUILT_CUDA)
  d["cuda"] = true;
  d["cuda_compiler_version"] = MMFREE_BUILD_CUDA_COMPILER_VERSION;
#else
  d["cuda"] = false;
#endif
  std::string archs = MMFREE_BUILD_CUDA_ARCHS;
  py::list arch_list;
  size_t start = 0;
  while (start < archs.size()) {
    size_t comma = archs.find(',', start);
    if (comma == std::string::npos) comma = archs.size();
    arch_list.append(archs.substr(start, comma - start));
    start = comma + 1;
  }
  d["cuda_archs"] = arch_list;
  py::list isas;
  for (auto isa : {mmfree::cpu::Isa::kScalar, mmfree::cpu::Isa::kAvx2, mmfree::cpu::Isa::kAvx512}) {
    if (mmfree::cpu::isa_compiled(isa)) isas.append(mmfree::cpu::isa_name(isa));
  }
  d["cpu_isas"] = isas;
  d["cxx_compiler"] = MMFREE_BUILD_CXX_COMPILER;
  return d;
}

py::dict cpu_features() {
  const auto& f = mmfree::cpu::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["bmi2"] = f.bmi2;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512_vnni"] = f.avx512vnni;
  d["avx512_bf16"] = f.avx512bf16;
  d["avx_vnni"] = f.avxvnni;
  d["best_isa"] = mmfree::cpu::isa_name(mmfree::cpu::best_isa());
  d["active_isa"] = mmfree::cpu::isa_name(mmfree::cpu::active_isa());
  return d;
}

void set_cpu_isa(const std::string& name) {
  mmfree::cpu::Isa isa;
  if (!mmfree::cpu::parse_isa(name, &isa)) {
    throw py::value_error("mmfree: cpu isa must be one of 'scalar', 'avx2', 'avx512', got '" + name + "'");
  }
  mmfree::cpu::set_isa_cap(isa);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfree-ext native module: registers torch.ops.mmfree.* on import";
  mmfree::cpu::set_parallel_backend(&torch_parallel_backend, &torch_thread_count);
  m.def("build_info", &build_info, "What this build was compiled with (torch, CUDA archs, CPU ISA paths).");
  m.def("cpu_features", &cpu_features, "What this CPU supports at run time, and the kernel path in use.");
  m.def("set_cpu_isa", &set_cpu_isa,
        "Cap the CPU kernel path ('scalar', 'avx2', 'avx512'); the best supported path below the cap is used.");
  m.def("cpu_isa", []() { return std::string(mmfree::cpu::isa_name(mmfree::cpu::active_isa())); },
        "The CPU kernel path in use.");
}

// The pybind11 module mmfree_ext._C. Importing it runs the STABLE_TORCH_LIBRARY
// registrations of every ops_*.cpp in this library (the torch.ops.mmfree.* schemas and
// their CPU kernels; the CUDA kernels live in the companion library _C_cuda, which
// mmfree_ext loads where torch has CUDA) and installs torch's thread pool as the CPU
// kernels' parallel backend. The module itself exposes only build and CPU information:
// ops are reached through torch.ops, never through pybind11 tensor functions, so that
// torch.compile and autograd see them. It uses torch only through the stable ABI.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>

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

// Whether torch's parallel_for runs its chunks at the same time, one thread each: true for
// the OpenMP backend (every chunk is a thread of one `omp parallel` team), not promised by
// the others (native pool, TBB). The stable ABI does not say which backend torch has, so
// mmfree_ext/_native.py reads torch.__config__.parallel_info() and sets it on import.
bool g_team_concurrent = false;

// A team over torch's threads: one torch::stable::parallel_for (torch's own at::parallel_for,
// compiled into libtorch with its OpenMP) over T = get_num_threads() indices with grain 1.
// With OpenMP every index is a thread of one team, all running at once. If the team got
// fewer threads than T, invocations hold chunks of several indices (ATen gives thread j the
// chunk starting at j * chunk): the participants are then the invocations, and the one
// holding index 0 publishes the chunk length so every invocation knows its id and the count.
// Inside another parallel region torch runs the loop inline as one chunk [0, T): a team of
// one. Backends that do not run chunks concurrently get a team of one.
void torch_team_backend(mmfree::cpu::TeamFn fn, void* ctx) {
  const int64_t total = static_cast<int64_t>(torch::stable::get_num_threads());
  if (g_team_concurrent && total > 1) {
    int64_t chunk = 0;  // set by the invocation holding index 0
    torch::stable::parallel_for(0, total, 1, [&](int64_t b, int64_t e) {
      if (b == 0) __atomic_store_n(&chunk, e, __ATOMIC_RELEASE);
      int64_t c;
      while ((c = __atomic_load_n(&chunk, __ATOMIC_ACQUIRE)) == 0) {
      }
      fn(ctx, static_cast<int>(b / c), static_cast<int>((total + c - 1) / c));
    });
    return;
  }
  fn(ctx, 0, 1);
}

// For the tests: the team size the kernels get now, and how many distinct threads the
// kernels' parallel_for ran `n` unit chunks on.
int team_threads() {
  int seen = 0;
  mmfree::cpu::parallel_team([&](int tid, int n) {
    if (tid == 0) seen = n;
  });
  return seen;
}

int parallel_for_threads(int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  mmfree::cpu::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    // Enough work per chunk that one thread cannot drain the range before the others start.
    volatile double acc = 0;
    for (int64_t i = b; i < e; ++i)
      for (int j = 0; j < 200000; ++j) acc = acc + 1e-9 * j;
    const std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int>(ids.size());
}

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
  d["amx_tile"] = f.amx_tile;
  d["amx_int8"] = f.amx_int8;
  d["amx_bf16"] = f.amx_bf16;
  d["best_isa"] = mmfree::cpu::isa_name(mmfree::cpu::best_isa());
  d["active_isa"] = mmfree::cpu::isa_name(mmfree::cpu::active_isa());
  d["ext_cap"] = mmfree::cpu::ext_name(mmfree::cpu::ext_cap());
  d["use_vnni512"] = mmfree::cpu::use_vnni512();
  d["use_vnni256"] = mmfree::cpu::use_vnni256();
  d["use_amx_int8"] = mmfree::cpu::use_amx_int8();
  d["use_amx_bf16"] = mmfree::cpu::use_amx_bf16();
  return d;
}

void set_cpu_isa(const std::string& name) {
  mmfree::cpu::Isa isa;
  if (!mmfree::cpu::parse_isa(name, &isa)) {
    throw py::value_error("mmfree: cpu isa must be one of 'scalar', 'avx2', 'avx512', got '" + name + "'");
  }
  mmfree::cpu::set_isa_cap(isa);
}

void set_cpu_ext(const std::string& name) {
  mmfree::cpu::Ext ext;
  if (!mmfree::cpu::parse_ext(name, &ext)) {
    throw py::value_error("mmfree: cpu extension cap must be one of 'none', 'vnni', 'amx', got '" + name + "'");
  }
  mmfree::cpu::set_ext_cap(ext);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfree-ext native module: registers torch.ops.mmfree.* on import";
  mmfree::cpu::set_parallel_backend(&torch_parallel_backend, &torch_thread_count);
  mmfree::cpu::set_team_backend(&torch_team_backend);
  m.def("build_info", &build_info, "What this build was compiled with (torch, CUDA archs, CPU ISA paths).");
  m.def("cpu_features", &cpu_features, "What this CPU supports at run time, and the kernel path in use.");
  m.def("set_cpu_isa", &set_cpu_isa,
        "Cap the CPU kernel path ('scalar', 'avx2', 'avx512'); the best supported path below the cap is used.");
  m.def("cpu_isa", []() { return std::string(mmfree::cpu::isa_name(mmfree::cpu::active_isa())); },
        "The CPU kernel path in use.");
  m.def("_set_team_concurrent", [](bool on) { g_team_concurrent = on; },
        "Whether torch's parallel_for runs its chunks concurrently (its OpenMP backend): enables teams.");
  m.def("_team_threads", &team_threads, "The team size the CPU kernels get now (tests).");
  m.def("_parallel_for_threads", &parallel_for_threads, py::arg("n"),
        "Distinct threads the CPU kernels' parallel_for ran n unit chunks on (tests).");
  m.def("set_cpu_ext", &set_cpu_ext,
        "Cap the instruction-set extensions the CPU kernels use ('none', 'vnni', 'amx'), below the ISA cap.");
  m.def("cpu_ext", []() { return std::string(mmfree::cpu::ext_name(mmfree::cpu::ext_cap())); },
        "The extension cap in use.");
}

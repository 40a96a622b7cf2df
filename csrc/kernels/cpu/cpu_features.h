// What the running CPU supports, and which compiled kernel path to take.
//
// Kernels call active_isa() and branch to the *_avx512 / *_avx2 / scalar variant. The
// choice is the best path that is both compiled into this build and supported by the
// CPU (and the OS, which must save the wide registers), capped by the environment
// variable MMFREE_CPU_ISA or set_isa_cap() so tests can force the slower paths.
#pragma once

#include <string>

namespace mmfree {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avxvnni = false;
  bool os_avx = false, os_avx512 = false;  // the OS saves ymm / zmm state
};

const CpuFeatures& cpu_features();
bool isa_compiled(Isa isa);
bool isa_supported(Isa isa);  // by this CPU and OS
Isa best_isa();               // compiled and supported, ignoring the cap
Isa active_isa();             // best_isa() capped by MMFREE_CPU_ISA / set_isa_cap()
void set_isa_cap(Isa cap);
const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

}  // namespace cpu
}  // namespace mmfree

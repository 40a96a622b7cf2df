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
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false;  // the OS saves ymm / zmm state
  bool os_amx = false;                     // XCR0 has the tile state (permission is asked on first use)
};

// Instruction-set extensions above the vector width, capped independently of the Isa so
// the tests can force each code path on one machine: kNone = no dot-product instructions
// (vpmaddubsw paths), kVnni = vpdpbusd (AVX-512 VNNI / AVX-VNNI), kAmx = AMX tiles too.
// MMFREE_CPU_EXT ("none", "vnni", "amx") or set_ext_cap() set the cap.
enum class Ext : int { kNone = 0, kVnni = 1, kAmx = 2 };

const CpuFeatures& cpu_features();
bool isa_compiled(Isa isa);
bool isa_supported(Isa isa);  // by this CPU and OS
Isa best_isa();               // compiled and supported, ignoring the cap
Isa active_isa();             // best_isa() capped by MMFREE_CPU_ISA / set_isa_cap()
void set_isa_cap(Isa cap);
const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

void set_ext_cap(Ext cap);
Ext ext_cap();
const char* ext_name(Ext ext);
bool parse_ext(const std::string& name, Ext* out);
// The paths to take now (compiled, supported by CPU and OS, and within both caps):
bool use_vnni512();  // AVX-512 VNNI (needs the AVX-512 path active)
bool use_vnni256();  // AVX-VNNI (the AVX2 or AVX-512 path active)
bool use_amx_int8(); // AMX-INT8 tiles (the AVX-512 path active; the first call asks Linux
                     // for the tile-data permission and reports false if it is refused)
bool use_amx_bf16(); // AMX-BF16 tiles (same conditions, with AMX-BF16 instead of AMX-INT8)

}  // namespace cpu
}  // namespace mmfree

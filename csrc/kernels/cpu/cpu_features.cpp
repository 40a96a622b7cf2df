#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define MMFREE_X86 1
#endif
#if defined(MMFREE_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mmfree {
namespace cpu {
namespace {

#if defined(MMFREE_X86)
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(MMFREE_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  f.f16c = (c >> 29) & 1;
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_avx = (xcr0 & 0x6) == 0x6;            // xmm + ymm
    f.os_avx512 = (xcr0 & 0xe6) == 0xe6;       // + opmask, zmm_hi256, hi16_zmm
    f.os_amx = (xcr0 & 0x60000) == 0x60000;    // XTILECFG + XTILEDATA
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = (b >> 5) & 1;
    f.bmi2 = (b >> 8) & 1;
    f.avx512f = (b >> 16) & 1;
    f.avx512dq = (b >> 17) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
    f.avx512vnni = (c >> 11) & 1;
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    f.amx_int8 = (d >> 25) & 1;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    f.avxvnni = (a >> 4) & 1;
    f.avx512bf16 = (a >> 5) & 1;
  }
  if (!f.os_avx) f.avx2 = f.fma = f.f16c = f.avxvnni = false;
  if (!f.os_avx512) f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = f.avx512vnni = f.avx512bf16 = false;
  if (!f.os_amx || !f.os_avx512) f.amx_tile = f.amx_int8 = f.amx_bf16 = false;
#endif
  return f;
}

Isa isa_from_env() {
  const char* env = std::getenv("MMFREE_CPU_ISA");
  Isa isa = Isa::kAvx512;
  if (env != nullptr && *env != '\0' && !parse_isa(env, &isa)) isa = Isa::kAvx512;
  return isa;
}

std::atomic<int> g_cap{-1};
std::atomic<int> g_ext_cap{-1};

Ext ext_from_env() {
  const char* env = std::getenv("MMFREE_CPU_EXT");
  Ext ext = Ext::kAmx;
  if (env != nullptr && *env != '\0' && !parse_ext(env, &ext)) ext = Ext::kAmx;
  return ext;
}

// Linux hands out the AMX tile-data state only to processes that ask for it (5.16+);
// without the permission the first tile instruction faults. Asked once per process.
bool amx_permitted() {
#if defined(MMFREE_X86) && defined(__linux__)
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
#if defined(MMFREE_HAVE_AVX2_KERNELS)
      return true;
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(MMFREE_HAVE_AVX512_KERNELS)
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return f.avx2 && f.fma && f.f16c && f.bmi2;
    case Isa::kAvx512:
      return isa_supported(Isa::kAvx2) && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  }
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (isa_compiled(isa) && isa_supported(isa)) return isa;
  }
  return Isa::kScalar;
}

Isa active_isa() {
  int cap = g_cap.load(std::memory_order_relaxed);
  if (cap < 0) {
    cap = static_cast<int>(isa_from_env());
    g_cap.store(cap, std::memory_order_relaxed);
  }
  const Isa best = best_isa();
  return static_cast<int>(best) < cap ? best : static_cast<Isa>(cap);
}

void set_isa_cap(Isa cap) { g_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

void set_ext_cap(Ext cap) { g_ext_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

Ext ext_cap() {
  int cap = g_ext_cap.load(std::memory_order_relaxed);
  if (cap < 0) {
    cap = static_cast<int>(ext_from_env());
    g_ext_cap.store(cap, std::memory_order_relaxed);
  }
  return static_cast<Ext>(cap);
}

const char* ext_name(Ext ext) {
  switch (ext) {
    case Ext::kNone: return "none";
    case Ext::kVnni: return "vnni";
    case Ext::kAmx: return "amx";
  }
  return "unknown";
}

bool parse_ext(const std::string& name, Ext* out) {
  if (name == "none") { *out = Ext::kNone; return true; }
  if (name == "vnni") { *out = Ext::kVnni; return true; }
  if (name == "amx") { *out = Ext::kAmx; return true; }
  return false;
}

bool use_vnni512() {
  return active_isa() == Isa::kAvx512 && ext_cap() >= Ext::kVnni && cpu_features().avx512vnni;
}

bool use_vnni256() {
  return isa_compiled(Isa::kAvx2) && active_isa() >= Isa::kAvx2 && ext_cap() >= Ext::kVnni && cpu_features().avxvnni;
}

bool use_amx_int8() {
#if !defined(MMFREE_HAVE_AMX_KERNELS)
  return false;
#endif
  const CpuFeatures& f = cpu_features();
  return active_isa() == Isa::kAvx512 && ext_cap() >= Ext::kAmx && f.amx_tile && f.amx_int8 && amx_permitted();
}

bool use_amx_bf16() {
#if !defined(MMFREE_HAVE_AMX_KERNELS)
  return false;
#endif
  const CpuFeatures& f = cpu_features();
  return active_isa() == Isa::kAvx512 && ext_cap() >= Ext::kAmx && f.amx_tile && f.amx_bf16 && amx_permitted();
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

bool parse_isa(const std::string& name, Isa* out) {
  if (name == "scalar") { *out = Isa::kScalar; return true; }
  if (name == "avx2") { *out = Isa::kAvx2; return true; }
  if (name == "avx512") { *out = Isa::kAvx512; return true; }
  return false;
}

}  // namespace cpu
}  // namespace mmfree

// Benchmark of the CPU ternary product (every compiled ISA path) and of the transposed
// backward product. Napkin (M=1): the packed weights, N*K/4 bytes, are the only traffic
// that scales; the floor is that size over the copy bandwidth. Weights rotate over
// several copies that together exceed the last-level cache, so every call streams from DRAM.
// Usage: bench_ternary [isa ...]   (default: every compiled and supported ISA)
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/ternary_format.h"
#include "cpu/cpu_features.h"
#include "ternary.h"

using namespace mmfree;

namespace {

constexpr double kColdBytes = 96.0 * 1024 * 1024;  // > L3 on the machines we time on

std::vector<uint8_t> random_packed(int64_t n, int64_t k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> p(static_cast<size_t>(n * ternary::row_bytes(k)));
  for (auto& b : p) {
    uint8_t v = 0;
    for (int j = 0; j < 4; ++j) v |= static_cast<uint8_t>(rng() % 3) << (2 * j);
    b = v;
  }
  return p;
}

void bench_forward(int64_t m, int64_t k, int64_t n, const char* isa) {
  const double wbytes = static_cast<double>(n * ternary::row_bytes(k));
  const int copies = static_cast<int>(std::max(1.0, std::ceil(kColdBytes / wbytes)));
  std::vector<std::vector<uint8_t>> ws;
  for (int c = 0; c < copies; ++c) ws.push_back(random_packed(n, k, 7 + c));
  std::vector<int8_t> x(static_cast<size_t>(m * k));
  std::mt19937_64 rng(3);
  for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
  std::vector<float> xs(static_cast<size_t>(m), 0.01f), out(static_cast<size_t>(m * n));
  const float w_scale = 0.02f;
  int call = 0;
  auto fn = [&] {
    TernaryMatmulParams p{x.data(), k, xs.data(), ws[call++ % copies].data(), &w_scale, out.data(),
                          DType::kFloat32, m, n, k};
    cpu::ternary_matmul(p);
  };
  char shape[96];
  std::snprintf(shape, sizeof(shape), "M=%lld %lld->%lld", static_cast<long long>(m), static_cast<long long>(k),
                static_cast<long long>(n));
  const double bytes = wbytes + static_cast<double>(m * k) + 4.0 * m * n;
  const int reps = m >= 256 ? 5 : (m >= 16 ? 10 : 50);
  bench::report(bench::time_cpu(std::string("ternary_matmul/") + isa, shape, bytes, 2.0 * m * n * k, fn, 2, reps));
}

void bench_transposed(int64_t m, int64_t k, int64_t n, const char* isa) {
  auto packed = random_packed(n, k, 11);
  std::vector<float> g(static_cast<size_t>(m * n));
  bench::fill_uniform(g, 5, -1.f, 1.f);
  std::vector<float> out(static_cast<size_t>(m * k));
  const float w_scale = 0.02f;
  TernaryMatmulTParams p{g.data(), packed.data(), &w_scale, out.data(), m, n, k};
  char shape[96];
  std::snprintf(shape, sizeof(shape), "M=%lld N=%lld->K=%lld", static_cast<long long>(m), static_cast<long long>(n),
                static_cast<long long>(k));
  const double bytes = static_cast<double>(packed.size()) + 4.0 * (m * n + m * k);
  bench::report(bench::time_cpu(std::string("ternary_matmul_t/") + isa, shape, bytes, 2.0 * m * n * k,
                                [&] { cpu::ternary_matmul_t(p); }, 1, 3));
}

}  // namespace

int main(int argc, char** argv) {
  bench::init_cpu_threads();
  std::printf("bench_ternary: %d CPU thread(s), best ISA %s\n", bench::cpu_threads(), cpu::isa_name(cpu::best_isa()));
  std::vector<cpu::Isa> isas;
  for (int i = 1; i < argc; ++i) {
    cpu::Isa isa;
    if (cpu::parse_isa(argv[i], &isa)) isas.push_back(isa);
  }
  if (isas.empty()) {
    for (auto isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2}) {
      if (cpu::isa_compiled(isa) && cpu::isa_supported(isa)) isas.push_back(isa);
    }
  }
  const int64_t shapes[][2] = {{2560, 2560}, {2560, 13824}, {6912, 2560}, {2560, 32000}};
  for (auto isa : isas) {
    cpu::set_isa_cap(isa);
    const char* name = cpu::isa_name(isa);
    for (const auto& s : shapes) bench_forward(1, s[0], s[1], name);
    for (int64_t m : {4, 16, 64, 512}) bench_forward(m, 2560, 13824, name);
    bench_forward(2048, 2560, 2560, name);
    bench_transposed(2048, 2560, 2560, name);
  }
  return 0;
}

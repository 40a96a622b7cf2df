mmfree_add_benchmark(bench_pack bench_pack.cpp)

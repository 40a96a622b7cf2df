mmfree_add_benchmark(bench_norm bench_norm.cpp)

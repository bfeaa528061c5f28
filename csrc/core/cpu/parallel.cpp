#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <vector>

#include "dspark/verify_chain.h"

namespace dspark {
namespace cpu {
namespace {
std::atomic<int> g_num_threads{0};
}

int num_threads() {
  const int n = g_num_threads.load();
  if (n > 0) return n;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

void parallel_for(int64_t n, double cost_per_item, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  // Below ~200k element operations a thread start (~20 us) costs more than it saves.
  const double total = cost_per_item * static_cast<double>(n);
  int64_t workers = std::min<int64_t>(num_threads(), n);
  if (total < 2e5) workers = 1;
  if (workers <= 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(workers);
  threads.reserve(workers - 1);
  const int64_t chunk = (n + workers - 1) / workers;
  for (int64_t w = 1; w < workers; ++w) {
    const int64_t b = w * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    threads.emplace_back([&, w, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[w] = std::current_exception();
      }
    });
  }
  try {
    fn(0, std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace cpu
}  // namespace dspark

extern "C" void dspark_set_num_threads(int n) { dspark::cpu::g_num_threads.store(n > 0 ? n : 0); }

#include <cstdlib>
#include <cstring>

#include "isa.h"

namespace dspark {
namespace cpu {

bool use_avx512() {
#if defined(DSPARK_HAVE_AVX512_VARIANTS) && (defined(__x86_64__) || defined(_M_X64))
  static const bool ok = [] {
    const char* env = std::getenv("DSPARK_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace dspark

// Internal: a minimal fork-join parallel loop for the CPU kernels (no OpenMP, so the core never
// fights torch's own libgomp for threads).
#ifndef DSPARK_CORE_CPU_PARALLEL_H_
#define DSPARK_CORE_CPU_PARALLEL_H_

#include <cstdint>
#include <functional>

namespace dspark {
namespace cpu {

// Threads the *_cpu entry points may use (dspark_set_num_threads).
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n). Runs inline when n or the
// estimated work (`cost_per_item`, in element operations) is too small to pay for a thread.
void parallel_for(int64_t n, double cost_per_item, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu
}  // namespace dspark

#endif  // DSPARK_CORE_CPU_PARALLEL_H_

// Internal: run-time selection between the CPU kernels' two compilations.
//
// A CPU kernel file that contains the marker DSPARK_ISA_VARIANTS is compiled twice on x86-64:
// once with the library's baseline flags (x86-64-v3: AVX2 + FMA) and once more, through a
// generated wrapper that defines DSPARK_ISA_AVX512, with -march=x86-64-v4 (AVX-512). Both copies
// live in ISA-tagged inline namespaces (DSPARK_ISA_TAG, see detail/hd.h); the C entry point,
// compiled only in the baseline copy, calls the AVX-512 copy when the CPU has it. The row loops
// keep a fixed number of accumulators, so both copies give bit-identical results.
// DSPARK_CPU_ISA=baseline in the environment forces the baseline copy.
#ifndef DSPARK_CORE_CPU_ISA_H_
#define DSPARK_CORE_CPU_ISA_H_

#include "dspark/detail/hd.h"

namespace dspark {
namespace cpu {

// True when the AVX-512 copies were built and this CPU (and DSPARK_CPU_ISA) allows them.
bool use_avx512();

}  // namespace cpu
}  // namespace dspark

// In the baseline copy, declare the AVX-512 copy of `fn` (signature `sig`) when it was built.
#if defined(DSPARK_HAVE_AVX512_VARIANTS) && !defined(DSPARK_ISA_AVX512)
#define DSPARK_DECLARE_AVX512_VARIANT(ret, fn, params) \
  namespace dspark {                                   \
  namespace cpu {                                      \
  namespace isa_avx512 {                               \
  ret fn params;                                       \
  }                                                    \
  }                                                    \
  }
#define DSPARK_ISA_CALL(fn, ...) \
  (::dspark::cpu::use_avx512() ? ::dspark::cpu::isa_avx512::fn(__VA_ARGS__) : ::dspark::cpu::isa_generic::fn(__VA_ARGS__))
#else
#define DSPARK_DECLARE_AVX512_VARIANT(ret, fn, params)
#define DSPARK_ISA_CALL(fn, ...) (::dspark::cpu::DSPARK_ISA_TAG::fn(__VA_ARGS__))
#endif

#endif  // DSPARK_CORE_CPU_ISA_H_

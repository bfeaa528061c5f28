// CPU kernel of dspark_target_forward_cpu: a Llama / Qwen3 target's forward over a ragged batch
// of chain blocks in one call (dspark/target_forward.h states the math and the weight layout).
//
// Execution: one team of threads runs the whole forward; each layer is a fixed sequence of
// phases separated by spin barriers. GEMMs split their 16-column panels across the team, so each
// weight byte is read once per call by one core, whatever the number of rows; the small phases
// (norms, RoPE, attention) split rows or (row, head) pairs. Nothing is allocated after set-up.
//
// GEMM micro-kernels (chosen once per process): AVX512-BF16 (vdpbf16ps on the bf16 pairs),
// AVX-512F and AVX2 (each bf16 pair widened to two fp32 lanes by a shift and a mask, then two
// FMAs), or plain C++. All compute sum_k bf16(x_k) * bf16(w_k) in fp32 in the same pair order.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DSPARK_TF_X86 1
#endif

#include "../common/status.h"
#include "dspark/detail/hd.h"
#include "dspark/detail/sampling.h"
#include "dspark/target_forward.h"
#include "parallel.h"

namespace dspark {
namespace cpu {
namespace {

constexpr int kPanel = 16;  // output features per panel
constexpr int kMaxRowsPerTile = 8;

inline uint16_t float_to_bf16(float f) {
  uint32_t u = detail::float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch's .to(bfloat16)
  return static_cast<uint16_t>(u >> 16);
}

// ------------------------------------------------------------------------------------------------
// Spin barrier for a fixed team (sense reversing). Yields after a while so an oversubscribed
// machine still makes progress.
// ------------------------------------------------------------------------------------------------
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    int spins = 0;
    while (gen_.load(std::memory_order_acquire) == gen) {
      if (++spins > 4000) std::this_thread::yield();
#if DSPARK_TF_X86
      else _mm_pause();
#endif
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// [begin, end) of `n` items for thread `tid` of `nt` (contiguous chunks).
inline void split(int64_t n, int tid, int nt, int64_t& b, int64_t& e) {
  const int64_t chunk = (n + nt - 1) / nt;
  b = std::min(n, tid * chunk);
  e = std::min(n, b + chunk);
}

// ------------------------------------------------------------------------------------------------
// GEMM over panels: tile[m][c] = sum_j x[m] pair j . panel pair j, for MB <= 8 rows.
// x: bf16 pairs as uint32 [rows][K2] (low half = even k); panel: [K2][16][2] bf16.
// ------------------------------------------------------------------------------------------------
enum class Isa { kGeneric, kAvx2, kAvx512, kAvx512Bf16, kAmx };

void tile_generic(const uint32_t* x, int64_t x_stride, int mb, const uint16_t* panel, int64_t k2,
                  float (*tile)[kPanel]) {
  for (int m = 0; m < mb; ++m) {
    float acc[kPanel] = {0};
    for (int64_t j = 0; j < k2; ++j) {
      const uint32_t xp = x[m * x_stride + j];
      const float x0 = detail::bits_to_float(xp << 16), x1 = detail::bits_to_float(xp & 0xffff0000u);
      const uint16_t* w = panel + j * 2 * kPanel;
      for (int c = 0; c < kPanel; ++c)
        acc[c] = std::fma(x1, detail::bf16_to_float(w[2 * c + 1]), std::fma(x0, detail::bf16_to_float(w[2 * c]), acc[c]));
    }
    for (int c = 0; c < kPanel; ++c) tile[m][c] = acc[c];
  }
}

#if DSPARK_TF_X86
template <int MB>
__attribute__((target("avx2,fma"))) void tile_avx2_mb(const uint32_t* x, int64_t xs, const uint16_t* panel,
                                                      int64_t k2, float (*tile)[kPanel]) {
  __m256 lo[MB], hi[MB];
  for (int m = 0; m < MB; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t j = 0; j < k2; ++j) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + j * 32));       // cols 0-7
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + j * 32 + 16));  // cols 8-15
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, mask));
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, mask));
    for (int m = 0; m < MB; ++m) {
      const uint32_t xp = x[m * xs + j];
      const __m256 x0 = _mm256_set1_ps(detail::bits_to_float(xp << 16));
      const __m256 x1 = _mm256_set1_ps(detail::bits_to_float(xp & 0xffff0000u));
      lo[m] = _mm256_fmadd_ps(x1, o0, _mm256_fmadd_ps(x0, e0, lo[m]));
      hi[m] = _mm256_fmadd_ps(x1, o1, _mm256_fmadd_ps(x0, e1, hi[m]));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(tile[m], lo[m]);
    _mm256_storeu_ps(tile[m] + 8, hi[m]);
  }
}

// AVX-512F: one 512-bit load = the panel's 16 columns x one pair; same FMA order as above
// (x0 * even then x1 * odd per column), so the AVX2 and AVX-512F paths agree bit for bit.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void tile_avx512_mb(
    const uint32_t* x, int64_t xs, const uint16_t* panel, int64_t k2, float (*tile)[kPanel]) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t j = 0; j < k2; ++j) {
    const __m512i w = _mm512_loadu_si512(panel + j * 32);
    const __m512 ev = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 od = _mm512_castsi512_ps(_mm512_and_si512(w, mask));
    for (int m = 0; m < MB; ++m) {
      const uint32_t xp = x[m * xs + j];
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(detail::bits_to_float(xp & 0xffff0000u)), od,
                               _mm512_fmadd_ps(_mm512_set1_ps(detail::bits_to_float(xp << 16)), ev, acc[m]));
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(tile[m], acc[m]);
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void tile_avx512bf16_mb(
    const uint32_t* x, int64_t xs, const uint16_t* panel, int64_t k2, float (*tile)[kPanel]) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k2; ++j) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + j * 32);
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * xs + j])));
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(tile[m], acc[m]);
}

// AVX2 register blocking: MB rows x NP panels at once. An accumulator's FMA chain is 2 FMAs per
// pair (4-cycle latency each), so each accumulator has one FMA in flight: 8 accumulators (4 rows
// x one panel, 2 x 2 or 1 x 4) are what both FMA pipes need. The activation comes pre-widened
// to fp32 (xf: [rows][2 * K2], even then odd element of each pair), so a broadcast is one load
// rather than scalar shifts and a move per row and pair. The products and their order per output
// are those of tile_avx2_mb (and of tile_generic): bit-identical results.
//
// pf / npf: npf cache lines from pf on are prefetched, spread evenly over the k2 steps, so the
// weight stream from memory keeps going while a row block re-reads panels from cache.
constexpr int kAvx2Rows = 4;  // rows of the widest block (6 spills: GCC keeps 12 accumulators on the stack)

template <int MB, int NP>
__attribute__((target("avx2,fma"))) void tiles_avx2(const float* xf, int64_t xfs, const uint16_t* panel0,
                                                    int64_t pe, int64_t k2, float (*tiles)[kAvx2Rows][kPanel],
                                                    const char* pf, int64_t npf) {
  __m256 lo[NP][MB], hi[NP][MB];
  for (int q = 0; q < NP; ++q)
    for (int m = 0; m < MB; ++m) lo[q][m] = hi[q][m] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t credit = 0;
  for (int64_t j = 0; j < k2; ++j) {
    for (credit += npf; credit >= k2; credit -= k2, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
    for (int q = 0; q < NP; ++q) {
      const uint16_t* wp = panel0 + q * pe + j * 32;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));       // cols 0-7
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 16));  // cols 8-15
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
      const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, mask));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
      const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, mask));
      for (int m = 0; m < MB; ++m) {
        const __m256 x0 = _mm256_broadcast_ss(xf + m * xfs + 2 * j);
        const __m256 x1 = _mm256_broadcast_ss(xf + m * xfs + 2 * j + 1);
        lo[q][m] = _mm256_fmadd_ps(x1, o0, _mm256_fmadd_ps(x0, e0, lo[q][m]));
        hi[q][m] = _mm256_fmadd_ps(x1, o1, _mm256_fmadd_ps(x0, e1, hi[q][m]));
      }
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int m = 0; m < MB; ++m) {
      _mm256_storeu_ps(tiles[q][m], lo[q][m]);
      _mm256_storeu_ps(tiles[q][m] + 8, hi[q][m]);
    }
}

// xf = the bf16 pairs of x widened to fp32, in a per-thread buffer that only ever grows.
__attribute__((target("avx2,fma"))) const float* widen_pairs(const uint32_t* x, int64_t xs, int64_t M, int64_t k2) {
  thread_local std::vector<float> buf;
  const size_t need = static_cast<size_t>(M) * 2 * k2;
  if (buf.size() < need) buf.resize(need);
  float* xf = buf.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < k2; ++j) {
      const uint32_t xp = x[m * xs + j];
      xf[(m * k2 + j) * 2] = detail::bits_to_float(xp << 16);
      xf[(m * k2 + j) * 2 + 1] = detail::bits_to_float(xp & 0xffff0000u);
    }
  return xf;
}

// Rows of a block of mb <= 4 rows over np <= 4 panels: the kernel calls it takes (for the
// prefetch share) and the calls themselves. 4 and 3 rows take one panel per call, 2 rows two
// panels, 1 row four, so every call keeps 6-8 accumulators.
inline int avx2_calls(int mb, int np) {
  if (mb >= 3) return np;
  if (mb == 2) return (np + 1) / 2;
  return np / 4 + (np % 4) / 2 + np % 2;
}

template <class Next>
void avx2_block(int mb, const float* xr, int64_t xfs, const uint16_t* base, int64_t pe, int64_t k2, int np,
                float (*tiles)[kAvx2Rows][kPanel], Next&& next) {
  const char* at;
  int64_t n;
  int q = 0;
  switch (mb) {
    case 4:
      for (; q < np; ++q) next(at, n), tiles_avx2<4, 1>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
      break;
    case 3:
      for (; q < np; ++q) next(at, n), tiles_avx2<3, 1>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
      break;
    case 2:
      for (; q + 2 <= np; q += 2) next(at, n), tiles_avx2<2, 2>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
      for (; q < np; ++q) next(at, n), tiles_avx2<2, 1>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
      break;
    default:
      for (; q + 4 <= np; q += 4) next(at, n), tiles_avx2<1, 4>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
      for (; q + 2 <= np; q += 2) next(at, n), tiles_avx2<1, 2>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
      for (; q < np; ++q) next(at, n), tiles_avx2<1, 1>(xr, xfs, base + q * pe, pe, k2, tiles + q, at, n);
  }
}

// For panels [p, p + np) (np <= 4) and every row block of x: tiles[q][0:mb] = rows m0..m0+mb of
// x . panel(p + q), then emit(m0, mb, tiles, np). Rows go in blocks of 4 (the remainder as one
// block of 1-3). The next group's panels (`ahead` of them, contiguous after this group's) are
// prefetched, an equal share in each kernel call of this group.
template <class Emit>
void avx2_panel_group(const float* xf, int64_t k2, int64_t M, const uint16_t* w, int64_t p, int np, int64_t ahead,
                      Emit&& emit) {
  alignas(32) float tiles[4][kAvx2Rows][kPanel];
  const int64_t pe = k2 * 2 * kPanel, xfs = 2 * k2;
  const uint16_t* base = w + p * pe;
  const int r = static_cast<int>(M % kAvx2Rows);
  const int64_t calls = (M / kAvx2Rows) * np + (r ? avx2_calls(r, np) : 0);
  const int64_t lines = ahead * k2;  // one 64-byte line per pair step of a panel
  const char* pf = reinterpret_cast<const char*>(base + np * pe);
  const int64_t per_call = (lines + calls - 1) / calls;
  int64_t left = lines;
  auto next = [&](const char*& at, int64_t& n) {
    n = std::min(per_call, left);
    at = pf;
    pf += 64 * n;
    left -= n;
  };
  for (int64_t m0 = 0; m0 < M; m0 += kAvx2Rows) {
    const int mb = static_cast<int>(std::min<int64_t>(kAvx2Rows, M - m0));
    avx2_block(mb, xf + m0 * xfs, xfs, base, pe, k2, np, tiles, next);
    emit(m0, mb, tiles, np);
  }
}

#define DSPARK_TF_TILE_SWITCH(fn, mb, ...) \
  switch (mb) {                            \
    case 1: fn<1>(__VA_ARGS__); break;     \
    case 2: fn<2>(__VA_ARGS__); break;     \
    case 3: fn<3>(__VA_ARGS__); break;     \
    case 4: fn<4>(__VA_ARGS__); break;     \
    case 5: fn<5>(__VA_ARGS__); break;     \
    case 6: fn<6>(__VA_ARGS__); break;     \
    case 7: fn<7>(__VA_ARGS__); break;     \
    default: fn<8>(__VA_ARGS__); break;    \
  }
#endif


#if DSPARK_TF_X86
// ---- AMX (tdpbf16ps): the panel layout [K2][16][2] is exactly a B tile of 16 pair-rows x 64 B,
// and 16 pairs of an activation row are an A tile row, so a tile product covers 16 rows x 16
// columns x 32 k. Used where K2 is a multiple of 16 (every model we run); compute then costs
// far less than streaming the weight, so 1 to 16 rows cost the same.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

thread_local int t_amx_rows = 0;  // rows the current thread's tile configuration was set for

__attribute__((target("amx-tile"))) void amx_configure(int mb) {
  if (t_amx_rows == mb) return;
  TileConfig cfg{};
  cfg.palette_id = 1;
  cfg.rows[0] = static_cast<uint8_t>(mb);  // A: mb rows x 16 pairs
  cfg.colsb[0] = 64;
  for (int t = 1; t <= 2; ++t) {  // B: 16 pair-rows x 16 columns
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t <= 7; ++t) {  // C: mb rows x 16 fp32
    cfg.rows[t] = static_cast<uint8_t>(mb);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  t_amx_rows = mb;
}

__attribute__((target("amx-tile"))) void amx_release() {
  if (t_amx_rows != 0) {
    _tile_release();
    t_amx_rows = 0;
  }
}

// Four panels at once (A loaded once per k chunk), tiles[q] = x[0:mb] . panel(p + q).
__attribute__((target("amx-tile,amx-bf16"))) void amx_tile4(const uint32_t* x, int64_t xs, int mb,
                                                             const uint16_t* p0, int64_t panel_elems, int64_t k2,
                                                             float (*tiles)[16][kPanel]) {
  amx_configure(mb);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  const int64_t xstride = xs * 4;
  for (int64_t c = 0; c < k2; c += 16) {
    _tile_loadd(0, x + c, xstride);
    const uint16_t* b = p0 + c * 2 * kPanel;
    _tile_loadd(1, b, 64);
    _tile_dpbf16ps(4, 0, 1);
    _tile_loadd(2, b + panel_elems, 64);
    _tile_dpbf16ps(5, 0, 2);
    _tile_loadd(1, b + 2 * panel_elems, 64);
    _tile_dpbf16ps(6, 0, 1);
    _tile_loadd(2, b + 3 * panel_elems, 64);
    _tile_dpbf16ps(7, 0, 2);
  }
  _tile_stored(4, tiles[0], 64);
  _tile_stored(5, tiles[1], 64);
  _tile_stored(6, tiles[2], 64);
  _tile_stored(7, tiles[3], 64);
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_tile1(const uint32_t* x, int64_t xs, int mb,
                                                             const uint16_t* panel, int64_t k2, float (*tile)[kPanel]) {
  amx_configure(mb);
  _tile_zero(4);
  for (int64_t c = 0; c < k2; c += 16) {
    _tile_loadd(0, x + c, xs * 4);
    _tile_loadd(1, panel + c * 2 * kPanel, 64);
    _tile_dpbf16ps(4, 0, 1);
  }
  _tile_stored(4, tile, 64);
}

bool amx_available() {
  if (!(__builtin_cpu_supports("avx512f"))) return false;
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
  if (!tile || !bf16) return false;
  // Linux hands out the AMX register state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

Isa detect_isa() {
#if DSPARK_TF_X86
  const char* env = std::getenv("DSPARK_CPU_ISA");
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (env != nullptr && std::strcmp(env, "generic") == 0) return Isa::kGeneric;
  if (env != nullptr && std::strcmp(env, "baseline") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kGeneric;
  if (env != nullptr && std::strcmp(env, "avx512") == 0) return avx512 ? Isa::kAvx512 : Isa::kGeneric;
  const bool no_amx = env != nullptr && std::strcmp(env, "avx512-bf16") == 0;
  if (avx512 && !no_amx && amx_available()) return Isa::kAmx;
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  if (avx512) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

void compute_tile(Isa which, const uint32_t* x, int64_t xs, int mb, const uint16_t* panel, int64_t k2,
                  float (*tile)[kPanel]) {
#if DSPARK_TF_X86
  switch (which) {
    case Isa::kAmx:  // K2 not a multiple of 16: the AVX-512 path (the same products)
      if (__builtin_cpu_supports("avx512bf16")) {
        DSPARK_TF_TILE_SWITCH(tile_avx512bf16_mb, mb, x, xs, panel, k2, tile) return;
      }
      DSPARK_TF_TILE_SWITCH(tile_avx512_mb, mb, x, xs, panel, k2, tile) return;
    case Isa::kAvx512Bf16: DSPARK_TF_TILE_SWITCH(tile_avx512bf16_mb, mb, x, xs, panel, k2, tile) return;
    case Isa::kAvx512: DSPARK_TF_TILE_SWITCH(tile_avx512_mb, mb, x, xs, panel, k2, tile) return;
    case Isa::kAvx2: DSPARK_TF_TILE_SWITCH(tile_avx2_mb, mb, x, xs, panel, k2, tile) return;
    default: break;
  }
#endif
  tile_generic(x, xs, mb, panel, k2, tile);
}

enum class Epilogue { kStore, kAdd };

// y[m][n] (=|+=) x[m] . W[n] for the panels [p0, p1) of a weight with n_out outputs.
inline void apply_tile(const float (*tile)[kPanel], int mb, float* y, int64_t ys, int nc, Epilogue ep) {
  for (int m = 0; m < mb; ++m) {
    float* dst = y + m * ys;
    if (ep == Epilogue::kStore)
      for (int c = 0; c < nc; ++c) dst[c] = tile[m][c];
    else
      for (int c = 0; c < nc; ++c) dst[c] += tile[m][c];
  }
}

#if DSPARK_TF_X86
void gemm_panels_amx(const uint32_t* x, int64_t xs, int64_t M, const uint16_t* w, int64_t k2, int64_t n_out,
                     int64_t p0, int64_t p1, float* y, int64_t ys, Epilogue ep) {
  alignas(64) float tiles[4][16][kPanel];
  const int64_t pe = k2 * 2 * kPanel;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int mb = static_cast<int>(std::min<int64_t>(16, M - m0));
    int64_t p = p0;
    for (; p + 4 <= p1; p += 4) {
      amx_tile4(x + m0 * xs, xs, mb, w + p * pe, pe, k2, tiles);
      for (int q = 0; q < 4; ++q) {
        const int64_t c0 = (p + q) * kPanel;
        apply_tile(tiles[q], mb, y + m0 * ys + c0, ys, static_cast<int>(std::min<int64_t>(kPanel, n_out - c0)), ep);
      }
    }
    for (; p < p1; ++p) {
      amx_tile1(x + m0 * xs, xs, mb, w + p * pe, k2, tiles[0]);
      const int64_t c0 = p * kPanel;
      apply_tile(tiles[0], mb, y + m0 * ys + c0, ys, static_cast<int>(std::min<int64_t>(kPanel, n_out - c0)), ep);
    }
  }
}
#endif

void gemm_panels(Isa which, const uint32_t* x, int64_t xs, int64_t M, const uint16_t* w, int64_t k2,
                 int64_t n_out, int64_t p0, int64_t p1, float* y, int64_t ys, Epilogue ep) {
#if DSPARK_TF_X86
  if (which == Isa::kAmx && k2 % 16 == 0) return gemm_panels_amx(x, xs, M, w, k2, n_out, p0, p1, y, ys, ep);
  if (which == Isa::kAvx2) {
    const float* xf = widen_pairs(x, xs, M, k2);
    for (int64_t p = p0; p < p1; p += 4) {
      const int np = static_cast<int>(std::min<int64_t>(4, p1 - p));
      const int64_t ahead = M >= 3 ? std::min<int64_t>(4, p1 - p - np) : 0;  // M < 4: one pass, streamed
      avx2_panel_group(xf, k2, M, w, p, np, ahead, [&](int64_t m0, int mb, const float (*tiles)[kAvx2Rows][kPanel], int n) {
        for (int q = 0; q < n; ++q) {
          const int64_t c0 = (p + q) * kPanel;
          apply_tile(tiles[q], mb, y + m0 * ys + c0, ys, static_cast<int>(std::min<int64_t>(kPanel, n_out - c0)), ep);
        }
      });
    }
    return;
  }
#endif
  float tile[kMaxRowsPerTile][kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = w + p * k2 * 2 * kPanel;
    const int64_t c0 = p * kPanel;
    const int nc = static_cast<int>(std::min<int64_t>(kPanel, n_out - c0));
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerTile) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxRowsPerTile, M - m0));
      compute_tile(which, x + m0 * xs, xs, mb, panel, k2, tile);
      apply_tile(tile, mb, y + m0 * ys + c0, ys, nc, ep);
    }
  }
}

// silu(g) = g * sigmoid(g) with exp of a non-positive argument only (branch-free: vectorises).
inline float silu(float g) {
  const float e = detail::exp_nonpos(-std::fabs(g));  // exp(-|g|) in (0, 1]
  const float num = g >= 0.0f ? g : g * e;
  return num / (1.0f + e);
}

// Dot product with 16 independent partial sums (a single chain would be FMA-latency bound) summed
// in a fixed order: the compiler vectorises it without reassociating anything.
constexpr int kLanes = 16;
inline float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float mean_square(const float* x, int64_t n) {
  return static_cast<float>(static_cast<double>(dot(x, x, n)) / static_cast<double>(n));
}

// act[m] (bf16 pairs) of columns 16q..16q+15 = silu(g) * u, g and u tiles of mb rows.
inline void swiglu_tile(const float (*g)[kPanel], const float (*u)[kPanel], int mb, uint32_t* act, int64_t as,
                        int64_t q) {
  for (int m = 0; m < mb; ++m) {
    uint32_t* dst = act + m * as + q * (kPanel / 2);
    for (int c = 0; c < kPanel; c += 2) {
      const uint32_t a0 = float_to_bf16(silu(g[m][c]) * u[m][c]);
      const uint32_t a1 = float_to_bf16(silu(g[m][c + 1]) * u[m][c + 1]);
      dst[c / 2] = a0 | (a1 << 16);
    }
  }
}

// act[m] (bf16 pairs) = silu(x W_gate^T) * (x W_up^T) for gate/up panel pairs [q0, q1).
void gemm_swiglu(Isa which, const uint32_t* x, int64_t xs, int64_t M, const uint16_t* w, int64_t k2, int64_t q0,
                 int64_t q1, uint32_t* act, int64_t as) {
  alignas(64) float tiles[4][16][kPanel];
  const int64_t pe = k2 * 2 * kPanel;
#if DSPARK_TF_X86
  if (which == Isa::kAmx && k2 % 16 == 0) {
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int mb = static_cast<int>(std::min<int64_t>(16, M - m0));
      const uint32_t* xm = x + m0 * xs;
      uint32_t* am = act + m0 * as;
      int64_t q = q0;
      for (; q + 2 <= q1; q += 2) {  // gate q, up q, gate q+1, up q+1: one 4-panel pass
        amx_tile4(xm, xs, mb, w + 2 * q * pe, pe, k2, tiles);
        swiglu_tile(tiles[0], tiles[1], mb, am, as, q);
        swiglu_tile(tiles[2], tiles[3], mb, am, as, q + 1);
      }
      for (; q < q1; ++q) {
        amx_tile1(xm, xs, mb, w + 2 * q * pe, k2, tiles[0]);
        amx_tile1(xm, xs, mb, w + (2 * q + 1) * pe, k2, tiles[1]);
        swiglu_tile(tiles[0], tiles[1], mb, am, as, q);
      }
    }
    return;
  }
  if (which == Isa::kAvx2) {  // gate q and up q are panels 2q and 2q + 1: two pairs per group
    const float* xf = widen_pairs(x, xs, M, k2);
    for (int64_t q = q0; q < q1; q += 2) {
      const int nq = static_cast<int>(std::min<int64_t>(2, q1 - q));
      const int64_t ahead = M >= 3 ? 2 * std::min<int64_t>(2, q1 - q - nq) : 0;
      avx2_panel_group(xf, k2, M, w, 2 * q, 2 * nq, ahead, [&](int64_t m0, int mb, const float (*tiles)[kAvx2Rows][kPanel], int) {
        for (int i = 0; i < nq; ++i) swiglu_tile(tiles[2 * i], tiles[2 * i + 1], mb, act + m0 * as, as, q + i);
      });
    }
    return;
  }
#endif
  for (int64_t q = q0; q < q1; ++q) {
    const uint16_t* gp = w + 2 * q * pe;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerTile) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxRowsPerTile, M - m0));
      compute_tile(which, x + m0 * xs, xs, mb, gp, k2, tiles[0]);
      compute_tile(which, x + m0 * xs, xs, mb, gp + pe, k2, tiles[1]);
      swiglu_tile(tiles[0], tiles[1], mb, act + m0 * as, as, q);
    }
  }
}

// dst (bf16 pairs, k2 entries) = bf16(rmsnorm(src) * w), src [k] fp32.
void rmsnorm_to_pairs(const float* src, const float* w, int64_t k, float eps, uint32_t* dst) {
  const float r = 1.0f / std::sqrt(mean_square(src, k) + eps);
  for (int64_t j = 0; j < (k + 1) / 2; ++j) {
    const uint32_t a = float_to_bf16(w[2 * j] * (src[2 * j] * r));
    const uint32_t b = 2 * j + 1 < k ? float_to_bf16(w[2 * j + 1] * (src[2 * j + 1] * r)) : 0u;
    dst[j] = a | (b << 16);
  }
}

void to_pairs(const float* src, int64_t k, uint32_t* dst) {
  for (int64_t j = 0; j < (k + 1) / 2; ++j) {
    const uint32_t a = float_to_bf16(src[2 * j]);
    const uint32_t b = 2 * j + 1 < k ? float_to_bf16(src[2 * j + 1]) : 0u;
    dst[j] = a | (b << 16);
  }
}

// s[0:n] = softmax(s[0:n]) in place: max, exp_nonpos of the shifted scores summed in order, scale.
inline void softmax_in_place(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = detail::exp_nonpos(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

#if DSPARK_TF_X86
// Scores and weighted sum of one (row, KV head) with AVX-512: each cached K/V row is loaded once
// into registers and used by the g query heads of the group (g * d / 16 <= 16 registers).
// Returns false when the shape does not fit (the caller runs the portable loops).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) bool attend_avx512(
    const float* q0, int64_t g, int64_t d, const float* K, const float* V, int64_t span, float scale,
    float* sc, float* out) {
  const int64_t nc = d / 16;
  if (d % 16 != 0 || g * nc > 16 || nc > 8) return false;
  __m512 q[16];
  for (int64_t hh = 0; hh < g; ++hh)
    for (int64_t c = 0; c < nc; ++c) q[hh * nc + c] = _mm512_loadu_ps(q0 + hh * d + 16 * c);
  for (int64_t j = 0; j < span; ++j) {
    const float* k = K + j * d;
    __m512 kv[8];
    for (int64_t c = 0; c < nc; ++c) kv[c] = _mm512_loadu_ps(k + 16 * c);
    for (int64_t hh = 0; hh < g; ++hh) {
      __m512 acc = _mm512_mul_ps(q[hh * nc], kv[0]);
      for (int64_t c = 1; c < nc; ++c) acc = _mm512_fmadd_ps(q[hh * nc + c], kv[c], acc);
      sc[hh * span + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t hh = 0; hh < g; ++hh) softmax_in_place(sc + hh * span, span);
  __m512 o[16];
  for (int64_t i = 0; i < g * nc; ++i) o[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < span; ++j) {
    const float* v = V + j * d;
    __m512 vv[8];
    for (int64_t c = 0; c < nc; ++c) vv[c] = _mm512_loadu_ps(v + 16 * c);
    for (int64_t hh = 0; hh < g; ++hh) {
      const __m512 w = _mm512_set1_ps(sc[hh * span + j]);
      for (int64_t c = 0; c < nc; ++c) o[hh * nc + c] = _mm512_fmadd_ps(w, vv[c], o[hh * nc + c]);
    }
  }
  for (int64_t hh = 0; hh < g; ++hh)
    for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(out + hh * d + 16 * c, o[hh * nc + c]);
  return true;
}
#endif

#if DSPARK_TF_X86
// AVX2 version of the same (row, KV head) unit. Scores go 8 keys at a time: 8 independent dot
// products (8 FMA chains) reduced together by a horizontal-add tree into one vector of 8 scores,
// so no score pays a serial 8-lane reduction. The weighted sum keeps d / 8 accumulators per head.
__attribute__((target("avx2,fma"))) bool attend_avx2(const float* q0, int64_t g, int64_t d, const float* K,
                                                    const float* V, int64_t span, float scale, float* sc,
                                                    float* out) {
  const int64_t nc = d / 8;
  if (d % 8 != 0 || nc > 16) return false;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t hh = 0; hh < g; ++hh) {
    const float* q = q0 + hh * d;
    float* s = sc + hh * span;
    int64_t j = 0;
    for (; j + 8 <= span; j += 8) {
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(K + (j + u) * d));
      for (int64_t c = 1; c < nc; ++c)
        for (int u = 0; u < 8; ++u)
          a[u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(K + (j + u) * d + 8 * c), a[u]);
      const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
      _mm256_storeu_ps(s + j, _mm256_mul_ps(sum, vscale));
    }
    for (; j < span; ++j) {
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(K + j * d));
      for (int64_t c = 1; c < nc; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(K + j * d + 8 * c), acc);
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      s[j] = (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))) * scale;
    }
    softmax_in_place(s, span);
    __m256 o[16];
    for (int64_t c = 0; c < nc; ++c) o[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < span; ++i) {
      const __m256 w = _mm256_broadcast_ss(s + i);
      for (int64_t c = 0; c < nc; ++c) o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(V + i * d + 8 * c), o[c]);
    }
    for (int64_t c = 0; c < nc; ++c) _mm256_storeu_ps(out + hh * d + 8 * c, o[c]);
  }
  return true;
}
#endif

// The portable (row, KV head) unit: any ISA, any head_dim.
void attend_portable(const float* q0, int64_t g, int64_t d, const float* K, const float* V, int64_t span,
                     float scale, float* sc, float* out) {
  for (int64_t j = 0; j < span; ++j) {
    const float* k = K + j * d;
    for (int64_t hh = 0; hh < g; ++hh) sc[hh * span + j] = dot(q0 + hh * d, k, d) * scale;
  }
  for (int64_t hh = 0; hh < g; ++hh) softmax_in_place(sc + hh * span, span);
  for (int64_t i = 0; i < g * d; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < span; ++j) {
    const float* v = V + j * d;
    for (int64_t hh = 0; hh < g; ++hh) {
      const float w = sc[hh * span + j];
      float* o = out + hh * d;
      for (int64_t i = 0; i < d; ++i) o[i] += w * v[i];
    }
  }
}

struct Plan {
  std::vector<int64_t> row_req, row_pos_in_cache;  // [T]
  int64_t span_max = 0;
};

class Forward {
 public:
  Forward(const dspark_target_forward_params& p, int nt) : p_(p), nt_(nt), barrier_(nt) {
    const int64_t T = p.num_rows, H = p.hidden_size, d = p.head_dim;
    Hq_ = p.num_heads;
    Hkv_ = p.num_kv_heads;
    nqkv_ = (Hq_ + 2 * Hkv_) * d;
    k2h_ = (H + 1) / 2;
    k2a_ = (Hq_ * d + 1) / 2;
    k2i_ = (p.intermediate_size + 1) / 2;
    xb_.assign(static_cast<size_t>(std::max<int64_t>(T, p.num_logit_rows)) * std::max(k2h_, k2a_), 0u);
    act_.assign(static_cast<size_t>(T) * k2i_, 0u);
    qkv_.assign(static_cast<size_t>(T) * nqkv_, 0.0f);
    cos_.assign(static_cast<size_t>(T) * (d / 2), 0.0f);
    sin_.assign(static_cast<size_t>(T) * (d / 2), 0.0f);
    row_req_.resize(T);
    row_cache_pos_.resize(T);
    row_span_.resize(T);
    int64_t span = 0;
    for (int32_t r = 0; r < p.num_requests; ++r)
      for (int64_t t = p.cu_seqlens[r]; t < p.cu_seqlens[r + 1]; ++t) {
        row_req_[t] = r;
        row_cache_pos_[t] = p.base[r] + (t - p.cu_seqlens[r]);
        // causal: the cached context and the block up to t; block attention: the whole block
        row_span_[t] = p.block_attention ? p.base[r] + (p.cu_seqlens[r + 1] - p.cu_seqlens[r]) : row_cache_pos_[t] + 1;
        span = std::max(span, row_span_[t]);
      }
    group_ = Hq_ / Hkv_;
    scratch_per_thread_ = group_ * (std::max<int64_t>(span, 1) + p.head_dim);
    scores_.assign(static_cast<size_t>(nt) * scratch_per_thread_, 0.0f);
    feature_slot_.assign(p.num_layers, -1);
    for (int32_t f = 0; f < p.num_feature_layers; ++f) feature_slot_[p.feature_layers[f]] = f;
    which_ = isa();
  }

  void run(int tid) {
    const dspark_target_forward_params& p = p_;
    const int64_t T = p.num_rows, H = p.hidden_size, d = p.head_dim, I = p.intermediate_size;
    const int64_t half = d / 2;
    int64_t b, e;
    split(T, tid, nt_, b, e);
    for (int64_t t = b; t < e; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float ang = static_cast<float>(p.positions[t]) * p.inv_freq[i];
        cos_[t * half + i] = std::cos(ang);
        sin_[t * half + i] = std::sin(ang);
      }
    const int64_t panels_qkv = (nqkv_ + kPanel - 1) / kPanel, panels_h = (H + kPanel - 1) / kPanel;
    const int64_t pairs_gu = I / kPanel;
    const int64_t layer_stride = p.max_requests * Hkv_ * p.max_seq * d;
    for (int32_t l = 0; l < p.num_layers; ++l) {
      const dspark_target_layer& L = p.layers[l];
      // 1. x = bf16(rmsnorm(h))
      split(T, tid, nt_, b, e);
      for (int64_t t = b; t < e; ++t) rmsnorm_to_pairs(p.h + t * H, L.input_norm, H, p.rms_norm_eps, &xb_[t * k2h_]);
      barrier_.wait();
      // 2. qkv
      split(panels_qkv, tid, nt_, b, e);
      gemm_panels(which_, xb_.data(), k2h_, T, L.qkv, k2h_, nqkv_, b, e, qkv_.data(), nqkv_, Epilogue::kStore);
      barrier_.wait();
      // 3. q/k norm + RoPE, K/V into the cache
      split(T * (Hq_ + Hkv_), tid, nt_, b, e);
      for (int64_t u = b; u < e; ++u) rope_unit(l, u / (Hq_ + Hkv_), u % (Hq_ + Hkv_), layer_stride);
      barrier_.wait();
      // 4. attention -> bf16 pairs of [T, Hq d], one (row, KV head) and its query heads at a time
      split(T * Hkv_, tid, nt_, b, e);
      for (int64_t u = b; u < e; ++u) attend_unit(tid, l, u / Hkv_, u % Hkv_, layer_stride);
      barrier_.wait();
      // 5. h += a W_o^T
      split(panels_h, tid, nt_, b, e);
      gemm_panels(which_, xb_.data(), k2a_, T, L.o, k2a_, H, b, e, p.h, H, Epilogue::kAdd);
      barrier_.wait();
      // 6. x = bf16(rmsnorm(h))
      split(T, tid, nt_, b, e);
      for (int64_t t = b; t < e; ++t) rmsnorm_to_pairs(p.h + t * H, L.post_norm, H, p.rms_norm_eps, &xb_[t * k2h_]);
      barrier_.wait();
      // 7. act = silu(x W_gate^T) * (x W_up^T)
      split(pairs_gu, tid, nt_, b, e);
      gemm_swiglu(which_, xb_.data(), k2h_, T, L.gate_up, k2h_, b, e, act_.data(), k2i_);
      barrier_.wait();
      // 8. h += act W_down^T
      split(panels_h, tid, nt_, b, e);
      gemm_panels(which_, act_.data(), k2i_, T, L.down, k2i_, H, b, e, p.h, H, Epilogue::kAdd);
      barrier_.wait();
      if (feature_slot_[l] >= 0) {  // reads h only, like step 1 of the next layer: no barrier needed
        split(T, tid, nt_, b, e);
        const int64_t F = p.num_feature_layers;
        for (int64_t t = b; t < e; ++t)
          std::memcpy(p.features + (t * F + feature_slot_[l]) * H, p.h + t * H, sizeof(float) * H);
      }
    }
    if (p.num_logit_rows == 0) return;
    const int64_t n = p.num_logit_rows;
    split(n, tid, nt_, b, e);
    for (int64_t i = b; i < e; ++i)
      rmsnorm_to_pairs(p.h + p.logit_rows[i] * H, p.final_norm, H, p.rms_norm_eps, &xb_[i * k2h_]);
    barrier_.wait();
    split((p.vocab_size + kPanel - 1) / kPanel, tid, nt_, b, e);
    gemm_panels(which_, xb_.data(), k2h_, n, p.lm_head, k2h_, p.vocab_size, b, e, p.logits, p.vocab_size,
                Epilogue::kStore);
  }

  // Hands the AMX tile state back (the team's threads end after run; the caller's thread stays).
  static void finish_thread() {
#if DSPARK_TF_X86
    if (isa() == Isa::kAmx) amx_release();
#endif
  }

 private:
  // RMSNorm (Qwen3) + rotate-half RoPE of head `hd` (q heads first, then k heads) of row t; k
  // heads and the matching v head are written to the cache.
  void rope_unit(int32_t l, int64_t t, int64_t hd, int64_t layer_stride) {
    const dspark_target_forward_params& p = p_;
    const int64_t d = p.head_dim, half = d / 2;
    float* x = &qkv_[t * nqkv_ + hd * d];
    const bool is_q = hd < Hq_;
    const float* bias = p.layers[l].qkv_bias;
    if (bias != nullptr)
      for (int64_t i = 0; i < d; ++i) x[i] += bias[hd * d + i];
    const float* nw = is_q ? p.layers[l].q_norm : p.layers[l].k_norm;
    if (nw != nullptr) {
      const float r = 1.0f / std::sqrt(mean_square(x, d) + p.rms_norm_eps);
      for (int64_t i = 0; i < d; ++i) x[i] = nw[i] * (x[i] * r);
    }
    const float* c = &cos_[t * half];
    const float* s = &sin_[t * half];
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i] + x1 * s[i];
    }
    if (is_q) return;
    const int64_t kvh = hd - Hq_;
    const int64_t r = row_req_[t];
    const int64_t off = l * layer_stride + ((p.slots[r] * Hkv_ + kvh) * p.max_seq + row_cache_pos_[t]) * d;
    std::memcpy(p.k_cache + off, x, sizeof(float) * d);
    const int64_t vcol = (Hq_ + Hkv_) * d + kvh * d;
    float* vdst = p.v_cache + off;
    const float* vsrc = &qkv_[t * nqkv_ + vcol];
    if (bias != nullptr)
      for (int64_t i = 0; i < d; ++i) vdst[i] = vsrc[i] + bias[vcol + i];
    else
      std::memcpy(vdst, vsrc, sizeof(float) * d);
  }

  // The `group` query heads that share KV head `kvh` read each cached K/V row once together.
  void attend_unit(int tid, int32_t l, int64_t t, int64_t kvh, int64_t layer_stride) {
    const dspark_target_forward_params& p = p_;
    const int64_t d = p.head_dim, g = group_;
    const int64_t r = row_req_[t];
    const int64_t span = row_span_[t];
    const int64_t off = l * layer_stride + (p.slots[r] * Hkv_ + kvh) * p.max_seq * d;
    const float* K = p.k_cache + off;
    const float* V = p.v_cache + off;
    const float* q0 = &qkv_[t * nqkv_ + kvh * g * d];  // query heads kvh*g .. kvh*g+g-1
    float* sc = &scores_[static_cast<size_t>(tid) * scratch_per_thread_];  // [g][span]
    float* out = sc + g * span;                                            // [g][d]
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    bool done = false;  // a vector path took the shape
#if DSPARK_TF_X86
    if (which_ == Isa::kAmx || which_ == Isa::kAvx512Bf16 || which_ == Isa::kAvx512)
      done = attend_avx512(q0, g, d, K, V, span, scale, sc, out);
    else if (which_ == Isa::kAvx2)
      done = attend_avx2(q0, g, d, K, V, span, scale, sc, out);
#endif
    if (!done) attend_portable(q0, g, d, K, V, span, scale, sc, out);
    for (int64_t hh = 0; hh < g; ++hh) to_pairs(out + hh * d, d, &xb_[t * k2a_ + (kvh * g + hh) * (d / 2)]);
  }

  const dspark_target_forward_params& p_;
  const int nt_;
  Barrier barrier_;
  Isa which_;
  int64_t Hq_, Hkv_, nqkv_, k2h_, k2a_, k2i_, group_ = 1, scratch_per_thread_ = 0;
  std::vector<uint32_t> xb_, act_;
  std::vector<float> qkv_, cos_, sin_, scores_;
  std::vector<int64_t> row_req_, row_cache_pos_, row_span_;
  std::vector<int32_t> feature_slot_;
};

// Drafter context injection (dspark_inject_context_cpu): fc + hidden_norm of the context rows,
// then per layer the k/v panels of its qkv weight, k norm + RoPE, cache writes. Same team and
// phase structure as Forward; the q panels are never read.
class InjectContext {
 public:
  InjectContext(const dspark_inject_context_params& p, int nt) : p_(p), nt_(nt), barrier_(nt) {
    const int64_t N = p.num_rows, H = p.hidden_size, d = p.head_dim;
    Hq_ = p.num_heads;
    Hkv_ = p.num_kv_heads;
    nqkv_ = (Hq_ + 2 * Hkv_) * d;
    k2f_ = (p.feature_size + 1) / 2;
    k2h_ = (H + 1) / 2;
    xf_.assign(static_cast<size_t>(N) * k2f_, 0u);
    xb_.assign(static_cast<size_t>(N) * k2h_, 0u);
    c_.assign(static_cast<size_t>(N) * H, 0.0f);
    kv_.assign(static_cast<size_t>(N) * nqkv_, 0.0f);  // q columns stay unused
    cos_.assign(static_cast<size_t>(N) * (d / 2), 0.0f);
    sin_.assign(static_cast<size_t>(N) * (d / 2), 0.0f);
    row_req_.resize(N);
    row_cache_pos_.resize(N);
    for (int32_t r = 0; r < p.num_requests; ++r)
      for (int64_t t = p.cu_seqlens[r]; t < p.cu_seqlens[r + 1]; ++t) {
        row_req_[t] = r;
        row_cache_pos_[t] = p.base[r] + (t - p.cu_seqlens[r]);
      }
    which_ = isa();
  }

  void run(int tid) {
    const dspark_inject_context_params& p = p_;
    const int64_t N = p.num_rows, H = p.hidden_size, d = p.head_dim, half = d / 2;
    int64_t b, e;
    split(N, tid, nt_, b, e);
    for (int64_t t = b; t < e; ++t) {
      to_pairs(p.features + t * p.feature_size, p.feature_size, &xf_[t * k2f_]);
      for (int64_t i = 0; i < half; ++i) {
        const float ang = static_cast<float>(p.positions[t]) * p.inv_freq[i];
        cos_[t * half + i] = std::cos(ang);
        sin_[t * half + i] = std::sin(ang);
      }
    }
    barrier_.wait();
    split((H + kPanel - 1) / kPanel, tid, nt_, b, e);
    gemm_panels(which_, xf_.data(), k2f_, N, p.fc, k2f_, H, b, e, c_.data(), H, Epilogue::kStore);
    barrier_.wait();
    split(N, tid, nt_, b, e);
    for (int64_t t = b; t < e; ++t) rmsnorm_to_pairs(&c_[t * H], p.context_norm, H, p.rms_norm_eps, &xb_[t * k2h_]);
    const int64_t panel_k = Hq_ * d / kPanel, panels_qkv = (nqkv_ + kPanel - 1) / kPanel;
    const int64_t layer_stride = p.max_requests * Hkv_ * p.max_seq * d;
    for (int32_t l = 0; l < p.num_layers; ++l) {
      barrier_.wait();  // xb_ ready (l = 0) / the previous layer's kv_ consumed
      split(panels_qkv - panel_k, tid, nt_, b, e);
      gemm_panels(which_, xb_.data(), k2h_, N, p.layers[l].qkv, k2h_, nqkv_, panel_k + b, panel_k + e, kv_.data(), nqkv_,
                  Epilogue::kStore);
      barrier_.wait();
      split(N * Hkv_, tid, nt_, b, e);
      for (int64_t u = b; u < e; ++u) kv_unit(l, u / Hkv_, u % Hkv_, layer_stride);
    }
  }

 private:
  // k head `kvh` of row t: bias, norm (Qwen3), RoPE, into the cache; its v head likewise.
  void kv_unit(int32_t l, int64_t t, int64_t kvh, int64_t layer_stride) {
    const dspark_inject_context_params& p = p_;
    const int64_t d = p.head_dim, half = d / 2;
    const dspark_target_layer& L = p.layers[l];
    const int64_t kcol = (Hq_ + kvh) * d, vcol = (Hq_ + Hkv_ + kvh) * d;
    float* x = &kv_[t * nqkv_ + kcol];
    if (L.qkv_bias != nullptr)
      for (int64_t i = 0; i < d; ++i) x[i] += L.qkv_bias[kcol + i];
    if (L.k_norm != nullptr) {
      const float r = 1.0f / std::sqrt(mean_square(x, d) + p.rms_norm_eps);
      for (int64_t i = 0; i < d; ++i) x[i] = L.k_norm[i] * (x[i] * r);
    }
    const float* c = &cos_[t * half];
    const float* s = &sin_[t * half];
    const int64_t r = row_req_[t];
    const int64_t off = l * layer_stride + ((p.slots[r] * Hkv_ + kvh) * p.max_seq + row_cache_pos_[t]) * d;
    float* kdst = p.k_cache + off;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      kdst[i] = x1 * c[i] - x2 * s[i];
      kdst[i + half] = x2 * c[i] + x1 * s[i];
    }
    const float* vsrc = &kv_[t * nqkv_ + vcol];
    float* vdst = p.v_cache + off;
    if (L.qkv_bias != nullptr)
      for (int64_t i = 0; i < d; ++i) vdst[i] = vsrc[i] + L.qkv_bias[vcol + i];
    else
      std::memcpy(vdst, vsrc, sizeof(float) * d);
  }

  const dspark_inject_context_params& p_;
  const int nt_;
  Barrier barrier_;
  Isa which_;
  int64_t Hq_, Hkv_, nqkv_, k2f_, k2h_;
  std::vector<uint32_t> xf_, xb_;
  std::vector<float> c_, kv_, cos_, sin_;
  std::vector<int64_t> row_req_, row_cache_pos_;
};

// Runs work.run(tid) on a team of nt threads (the caller is thread 0); rethrows the first error.
template <class Work>
void run_team(Work& work, int nt) {
  std::vector<std::thread> team;
  std::vector<std::exception_ptr> errors(nt);
  for (int t = 1; t < nt; ++t)
    team.emplace_back([&, t] {
      try {
        work.run(t);
        Forward::finish_thread();
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  try {
    work.run(0);
    Forward::finish_thread();
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : team) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

const char* isa_name(Isa v) {
  switch (v) {
    case Isa::kAmx: return "amx-bf16";
    case Isa::kAvx512Bf16: return "avx512-bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

#define TF_REQUIRE(cond, msg) DSPARK_CHECK_ARG(cond, std::string("target_forward: ") + msg)

dspark_status check(const dspark_target_forward_params* p) {
  TF_REQUIRE(p != nullptr, "params is NULL");
  TF_REQUIRE(p->num_layers >= 1, "num_layers must be >= 1");
  TF_REQUIRE(p->hidden_size >= 1, "hidden_size must be >= 1");
  TF_REQUIRE(p->intermediate_size >= kPanel && p->intermediate_size % kPanel == 0,
             "intermediate_size must be a positive multiple of 16, got " + std::to_string(p->intermediate_size));
  TF_REQUIRE(p->num_heads >= 1 && p->num_kv_heads >= 1 && p->num_heads % p->num_kv_heads == 0,
             "num_heads must be a positive multiple of num_kv_heads");
  TF_REQUIRE(p->head_dim >= 2 && p->head_dim % 2 == 0 && p->head_dim <= 256,
             "head_dim must be even and in [2, 256], got " + std::to_string(p->head_dim));
  TF_REQUIRE(p->vocab_size >= 1, "vocab_size must be >= 1");
  TF_REQUIRE(p->rms_norm_eps > 0.0f, "rms_norm_eps must be > 0");
  TF_REQUIRE(p->inv_freq && p->layers && p->lm_head && p->final_norm, "inv_freq, layers, lm_head and final_norm are required");
  for (int32_t l = 0; l < p->num_layers; ++l) {
    const dspark_target_layer& L = p->layers[l];
    TF_REQUIRE(L.qkv && L.o && L.gate_up && L.down && L.input_norm && L.post_norm,
               "layers[" + std::to_string(l) + "] has a NULL weight");
    TF_REQUIRE((L.q_norm == nullptr) == (L.k_norm == nullptr),
               "layers[" + std::to_string(l) + "]: q_norm and k_norm must both be given or both be NULL");
  }
  TF_REQUIRE(p->num_requests >= 0 && p->num_rows >= 0, "num_requests and num_rows must be >= 0");
  TF_REQUIRE(p->max_requests >= 1 && p->max_seq >= 1, "max_requests and max_seq must be >= 1");
  if (p->num_rows > 0) TF_REQUIRE(p->h && p->positions && p->k_cache && p->v_cache, "h, positions, k_cache, v_cache are required");
  TF_REQUIRE(p->cu_seqlens != nullptr, "cu_seqlens is required");
  TF_REQUIRE(p->num_requests == 0 || (p->slots && p->base), "slots and base are required");
  TF_REQUIRE(p->cu_seqlens[0] == 0 && p->cu_seqlens[p->num_requests] == p->num_rows,
             "cu_seqlens must start at 0 and end at num_rows");
  std::vector<char> seen(static_cast<size_t>(p->max_requests), 0);
  for (int32_t r = 0; r < p->num_requests; ++r) {
    const int64_t n = p->cu_seqlens[r + 1] - p->cu_seqlens[r];
    const std::string rs = std::to_string(r);
    TF_REQUIRE(n >= 0, "cu_seqlens must be non-decreasing (request " + rs + ")");
    TF_REQUIRE(p->slots[r] >= 0 && p->slots[r] < p->max_requests, "slots[" + rs + "] out of [0, max_requests)");
    TF_REQUIRE(!seen[p->slots[r]], "slots must be distinct (slot " + std::to_string(p->slots[r]) + " twice)");
    seen[p->slots[r]] = 1;
    TF_REQUIRE(p->base[r] >= 0 && p->base[r] + n <= p->max_seq,
               "base[" + rs + "] + rows = " + std::to_string(p->base[r] + n) + " exceeds max_seq = " +
                   std::to_string(p->max_seq));
  }
  TF_REQUIRE(p->block_attention == 0 || p->block_attention == 1, "block_attention must be 0 or 1");
  TF_REQUIRE(p->num_feature_layers >= 0, "num_feature_layers must be >= 0");
  if (p->num_feature_layers > 0) {
    TF_REQUIRE(p->feature_layers && (p->features || p->num_rows == 0), "feature_layers and features are required");
    for (int32_t f = 0; f < p->num_feature_layers; ++f)
      TF_REQUIRE(p->feature_layers[f] >= 0 && p->feature_layers[f] < p->num_layers,
                 "feature_layers[" + std::to_string(f) + "] out of [0, num_layers)");
    for (int32_t f = 0; f < p->num_feature_layers; ++f)
      for (int32_t g = f + 1; g < p->num_feature_layers; ++g)
        TF_REQUIRE(p->feature_layers[f] != p->feature_layers[g], "feature_layers must be distinct");
  }
  TF_REQUIRE(p->num_logit_rows >= 0, "num_logit_rows must be >= 0");
  if (p->num_logit_rows > 0) {
    TF_REQUIRE(p->logit_rows && p->logits, "logit_rows and logits are required");
    for (int64_t i = 0; i < p->num_logit_rows; ++i)
      TF_REQUIRE(p->logit_rows[i] >= 0 && p->logit_rows[i] < p->num_rows,
                 "logit_rows[" + std::to_string(i) + "] out of [0, num_rows)");
  }
  return DSPARK_OK;
}

#define IC_REQUIRE(cond, msg) DSPARK_CHECK_ARG(cond, std::string("inject_context: ") + msg)

dspark_status check_inject(const dspark_inject_context_params* p) {
  IC_REQUIRE(p != nullptr, "params is NULL");
  IC_REQUIRE(p->num_layers >= 1, "num_layers must be >= 1");
  IC_REQUIRE(p->hidden_size >= 1, "hidden_size must be >= 1");
  IC_REQUIRE(p->num_heads >= 1 && p->num_kv_heads >= 1 && p->num_heads % p->num_kv_heads == 0,
             "num_heads must be a positive multiple of num_kv_heads");
  IC_REQUIRE(p->head_dim >= 2 && p->head_dim % 2 == 0 && p->head_dim <= 256,
             "head_dim must be even and in [2, 256], got " + std::to_string(p->head_dim));
  IC_REQUIRE(static_cast<int64_t>(p->num_heads) * p->head_dim % kPanel == 0,
             "num_heads * head_dim must be a multiple of 16 (the k rows start a panel)");
  IC_REQUIRE(p->rms_norm_eps > 0.0f, "rms_norm_eps must be > 0");
  IC_REQUIRE(p->feature_size >= 1, "feature_size must be >= 1");
  IC_REQUIRE(p->inv_freq && p->layers && p->fc && p->context_norm, "inv_freq, layers, fc and context_norm are required");
  for (int32_t l = 0; l < p->num_layers; ++l)
    IC_REQUIRE(p->layers[l].qkv != nullptr, "layers[" + std::to_string(l) + "].qkv is NULL");
  IC_REQUIRE(p->num_requests >= 0 && p->num_rows >= 0, "num_requests and num_rows must be >= 0");
  IC_REQUIRE(p->max_requests >= 1 && p->max_seq >= 1, "max_requests and max_seq must be >= 1");
  if (p->num_rows > 0)
    IC_REQUIRE(p->features && p->positions && p->k_cache && p->v_cache, "features, positions, k_cache, v_cache are required");
  IC_REQUIRE(p->cu_seqlens != nullptr, "cu_seqlens is required");
  IC_REQUIRE(p->num_requests == 0 || (p->slots && p->base), "slots and base are required");
  IC_REQUIRE(p->cu_seqlens[0] == 0 && p->cu_seqlens[p->num_requests] == p->num_rows,
             "cu_seqlens must start at 0 and end at num_rows");
  std::vector<char> seen(static_cast<size_t>(p->max_requests), 0);
  for (int32_t r = 0; r < p->num_requests; ++r) {
    const int64_t n = p->cu_seqlens[r + 1] - p->cu_seqlens[r];
    const std::string rs = std::to_string(r);
    IC_REQUIRE(n >= 0, "cu_seqlens must be non-decreasing (request " + rs + ")");
    IC_REQUIRE(p->slots[r] >= 0 && p->slots[r] < p->max_requests, "slots[" + rs + "] out of [0, max_requests)");
    IC_REQUIRE(!seen[p->slots[r]], "slots must be distinct (slot " + std::to_string(p->slots[r]) + " twice)");
    seen[p->slots[r]] = 1;
    IC_REQUIRE(p->base[r] >= 0 && p->base[r] + n <= p->max_seq,
               "base[" + rs + "] + rows = " + std::to_string(p->base[r] + n) + " exceeds max_seq = " +
                   std::to_string(p->max_seq));
  }
  return DSPARK_OK;
}

}  // namespace
}  // namespace cpu
}  // namespace dspark

extern "C" int64_t dspark_target_panel_elements(int64_t n, int64_t k) {
  return ((n + 15) / 16) * ((k + 1) / 2) * 32;
}

extern "C" const char* dspark_target_forward_isa(void) { return dspark::cpu::isa_name(dspark::cpu::isa()); }

extern "C" dspark_status dspark_target_forward_cpu(const dspark_target_forward_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = cpu::check(params);
  if (st != DSPARK_OK || params->num_rows == 0) return st;
  try {
    const int want = params->num_threads > 0 ? params->num_threads : cpu::num_threads();
    const int nt = std::max(1, want);
    cpu::Forward fwd(*params, nt);
    cpu::run_team(fwd, nt);
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "target_forward: out of host memory for scratch");
  } catch (const std::exception& e) {
    return fail(DSPARK_ERR_INTERNAL, std::string("target_forward: ") + e.what());
  }
  return DSPARK_OK;
}

extern "C" dspark_status dspark_inject_context_cpu(const dspark_inject_context_params* params) {
  using namespace dspark;
  clear_error();
  const dspark_status st = cpu::check_inject(params);
  if (st != DSPARK_OK || params->num_rows == 0) return st;
  try {
    const int want = params->num_threads > 0 ? params->num_threads : cpu::num_threads();
    const int nt = std::max(1, want);
    cpu::InjectContext work(*params, nt);
    cpu::run_team(work, nt);
  } catch (const std::bad_alloc&) {
    return fail(DSPARK_ERR_OUT_OF_MEMORY, "inject_context: out of host memory for scratch");
  } catch (const std::exception& e) {
    return fail(DSPARK_ERR_INTERNAL, std::string("inject_context: ") + e.what());
  }
  return DSPARK_OK;
}

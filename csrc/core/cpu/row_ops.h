// Internal: CPU passes over one vocabulary row, shared by the sampling kernels (verify_chain,
// verify_tree, dspark_draft). Loops keep LANES independent accumulators so the compiler
// vectorises them without -ffast-math (NaN and inf semantics stay exact).
#ifndef DSPARK_CORE_CPU_ROW_OPS_H_
#define DSPARK_CORE_CPU_ROW_OPS_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "dspark/detail/sampling.h"

namespace dspark {
namespace cpu {
inline namespace DSPARK_ISA_TAG {

constexpr int LANES = 16;

// The distribution of a logit row after temperature and truncation (see detail/sampling.h).
struct RowDist {
  float m = detail::kNegInf;    // max kept scaled logit
  float thr = detail::kNegInf;  // truncation threshold (kept iff s >= thr)
  double sum = 0.0;             // S = sum of kept weights
  bool valid = false;           // false when no entry has a finite or +inf logit
};

template <typename T>
inline float row_max_scaled(const T* row, int64_t V, float inv_t, float thr) {
  float lane[LANES];
  for (int j = 0; j < LANES; ++j) lane[j] = detail::kNegInf;
  int64_t v = 0;
  for (; v + LANES <= V; v += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const float s = detail::scaled_logit(detail::load_as_float(row, v + j), inv_t);
      const float ks = s >= thr ? s : detail::kNegInf;
      lane[j] = ks > lane[j] ? ks : lane[j];
    }
  }
  float m = detail::kNegInf;
  for (; v < V; ++v) {
    const float s = detail::scaled_logit(detail::load_as_float(row, v), inv_t);
    if (s >= thr && s > m) m = s;
  }
  for (int j = 0; j < LANES; ++j) m = lane[j] > m ? lane[j] : m;
  return m;
}

template <typename T>
inline double row_sum_weights(const T* row, int64_t V, float inv_t, float m, float thr) {
  if (m == detail::kPosInf) {
    double n = 0;
    for (int64_t v = 0; v < V; ++v)
      n += detail::row_weight(detail::scaled_logit(detail::load_as_float(row, v), inv_t), m, thr);
    return n;
  }
  float lane[LANES] = {0};
  int64_t v = 0;
  for (; v + LANES <= V; v += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const float s = detail::scaled_logit(detail::load_as_float(row, v + j), inv_t);
      const float e = detail::exp_nonpos(s - m);
      lane[j] += s >= thr ? e : 0.0f;
    }
  }
  double sum = 0.0;
  for (; v < V; ++v)
    sum += detail::row_weight(detail::scaled_logit(detail::load_as_float(row, v), inv_t), m, thr);
  for (int j = 0; j < LANES; ++j) sum += lane[j];
  return sum;
}

template <typename T>
inline RowDist row_distribution(const T* row, int64_t V, float inv_t, float thr) {
  RowDist d;
  d.thr = thr;
  d.m = row_max_scaled(row, V, inv_t, thr);
  if (!(d.m > detail::kNegInf)) return d;  // all -inf / NaN
  d.sum = row_sum_weights(row, V, inv_t, d.m, thr);
  d.valid = d.sum > 0.0;
  return d;
}

// p_v in probability units.
template <typename T>
inline float probability(const T* row, int64_t v, float inv_t, const RowDist& d) {
  const float w = detail::row_weight(detail::scaled_logit(detail::load_as_float(row, v), inv_t), d.m, d.thr);
  return static_cast<float>(w / d.sum);
}

// First index of the maximum (NaN never wins); -1 if no entry exceeds -inf. Each lane keeps the
// first index of its own maximum, so the answer is the smallest index among lanes holding the max.
template <typename T>
inline int64_t row_argmax(const T* row, int64_t V) {
  float lane_max[LANES];
  int64_t lane_idx[LANES];
  for (int j = 0; j < LANES; ++j) {
    lane_max[j] = detail::kNegInf;
    lane_idx[j] = -1;
  }
  int64_t v = 0;
  for (; v + LANES <= V; v += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const float x = detail::load_as_float(row, v + j);
      const bool gt = x > lane_max[j];
      lane_max[j] = gt ? x : lane_max[j];
      lane_idx[j] = gt ? v + j : lane_idx[j];
    }
  }
  float best = detail::kNegInf;
  int64_t arg = -1;
  for (int j = 0; j < LANES; ++j) {
    if (lane_max[j] > best || (lane_max[j] == best && lane_idx[j] >= 0 && lane_idx[j] < arg)) {
      best = lane_max[j];
      arg = lane_idx[j];
    }
  }
  for (; v < V; ++v) {
    const float x = detail::load_as_float(row, v);
    if (x > best) {
      best = x;
      arg = v;
    }
  }
  return arg;
}

// Inverse-CDF scan over weights produced block by block: returns the first v whose cumulative
// weight (index order, double accumulation) exceeds `target`, or the last positive entry when
// rounding leaves the target unreached (-1 if every weight is 0). `fill(v0, n, w)` writes the
// weights of v0 .. v0+n-1 into w; it is a vectorisable loop, and whole blocks whose sum cannot
// reach the target are skipped without a sequential scan.
template <typename Fill>
inline int64_t scan_blocks(int64_t V, double target, Fill&& fill) {
  constexpr int64_t B = 512;
  float w[B];
  double cum = 0.0;
  int64_t last_positive = -1;
  for (int64_t v0 = 0; v0 < V; v0 += B) {
    const int64_t n = V - v0 < B ? V - v0 : B;
    fill(v0, n, w);
    float lane[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
      for (int j = 0; j < LANES; ++j) lane[j] += w[i + j];
    double block = 0.0;
    for (; i < n; ++i) block += w[i];
    for (int j = 0; j < LANES; ++j) block += lane[j];
    if (block <= 0.0) continue;
    if (cum + block * (1.0 + 1e-4) <= target) {  // cannot cross inside this block, even with rounding
      cum += block;
      for (int64_t k = n - 1; k >= 0; --k)
        if (w[k] > 0.0f) {
          last_positive = v0 + k;
          break;
        }
      continue;
    }
    for (int64_t k = 0; k < n; ++k) {
      if (w[k] > 0.0f) {
        cum += w[k];
        last_positive = v0 + k;
        if (cum > target) return v0 + k;
      }
    }
  }
  return last_positive;
}

// Inverse-CDF draw from the row distribution with uniform u in [0, 1): the first v whose
// cumulative weight exceeds u * S (double accumulation in index order).
template <typename T>
inline int64_t sample_from(const T* row, int64_t V, float inv_t, const RowDist& d, double u) {
  if (d.m == detail::kPosInf) {
    return scan_blocks(V, u * d.sum, [&](int64_t v0, int64_t n, float* w) {
      for (int64_t i = 0; i < n; ++i)
        w[i] = detail::row_weight(detail::scaled_logit(detail::load_as_float(row, v0 + i), inv_t), d.m, d.thr);
    });
  }
  return scan_blocks(V, u * d.sum, [&](int64_t v0, int64_t n, float* w) {
    for (int64_t i = 0; i < n; ++i) {
      const float s = detail::scaled_logit(detail::load_as_float(row, v0 + i), inv_t);
      const float e = detail::exp_nonpos(s - d.m);
      w[i] = s >= d.thr ? e : 0.0f;
    }
  });
}

// Scaled-logit threshold implementing top-k then top-p (ties at the boundary kept).
template <typename T>
inline float truncation_threshold(const T* row, int64_t V, float inv_t, int32_t top_k, float top_p,
                                  std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) scratch[v] = detail::scaled_logit(detail::load_as_float(row, v), inv_t);
  float thr = detail::kNegInf;
  size_t n = static_cast<size_t>(V);
  if (top_k > 0) {
    std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(), std::greater<float>());
    thr = scratch[top_k - 1];
    // keep the candidates (>= thr) at the front for the top-p step
    n = static_cast<size_t>(std::partition(scratch.begin(), scratch.end(), [thr](float s) { return s >= thr; }) -
                            scratch.begin());
  }
  if (top_p >= 1.0f) return thr;
  float m = detail::kNegInf;
  for (size_t i = 0; i < n; ++i) m = std::max(m, scratch[i]);
  if (!(m > detail::kNegInf)) return thr;
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) total += detail::row_weight(scratch[i], m, detail::kNegInf);
  const double need = static_cast<double>(top_p) * total;
  // Sort a growing head of the candidates until it holds the needed mass.
  size_t head = std::min<size_t>(n, 64);
  for (;;) {
    std::partial_sort(scratch.begin(), scratch.begin() + head, scratch.begin() + n, std::greater<float>());
    double cum = 0.0;
    for (size_t i = 0; i < head; ++i) {
      cum += detail::row_weight(scratch[i], m, detail::kNegInf);
      if (cum >= need) return std::max(thr, scratch[i]);
    }
    if (head == n) return std::max(thr, scratch[n - 1]);
    head = std::min(n, head * 4);
  }
}

// sum_v min(p_v, q_v) and sum_v max(0, p_v - q_v), q given as logits with distribution qd.
template <typename T, typename D>
inline void overlap_logits(const T* trow, const RowDist& pd, const D* qrow, const RowDist& qd, int64_t V,
                           float inv_t, double* min_sum, double* residual_sum) {
  double mn = 0.0, res = 0.0;
  if (!qd.valid) {  // no draft mass anywhere: q = 0
    *min_sum = 0.0;
    *residual_sum = 1.0;
    return;
  }
  const float ip = static_cast<float>(1.0 / pd.sum), iq = static_cast<float>(1.0 / qd.sum);
  float lmn[LANES] = {0}, lres[LANES] = {0};
  const bool fast = pd.m != detail::kPosInf && qd.m != detail::kPosInf;
  int64_t v = 0;
  if (fast) {
    for (; v + LANES <= V; v += LANES) {
      for (int j = 0; j < LANES; ++j) {
        const float s = detail::scaled_logit(detail::load_as_float(trow, v + j), inv_t);
        const float pv = s >= pd.thr ? detail::exp_nonpos(s - pd.m) * ip : 0.0f;
        const float sq = detail::scaled_logit(detail::load_as_float(qrow, v + j), inv_t);
        const float qv = detail::exp_nonpos(sq - qd.m) * iq;
        lmn[j] += pv < qv ? pv : qv;
        lres[j] += pv > qv ? pv - qv : 0.0f;
      }
    }
  }
  for (; v < V; ++v) {
    const float pv = probability(trow, v, inv_t, pd);
    const float qv = probability(qrow, v, inv_t, qd);
    mn += std::min(pv, qv);
    res += std::max(0.0f, pv - qv);
  }
  for (int j = 0; j < LANES; ++j) {
    mn += lmn[j];
    res += lres[j];
  }
  *min_sum = mn;
  *residual_sum = res;
}

// Same with q given as probabilities (used as given; negative and NaN entries count as 0).
template <typename T, typename D>
inline void overlap_probs(const T* trow, const RowDist& pd, const D* qrow, int64_t V, float inv_t,
                          double* min_sum, double* residual_sum) {
  double mn = 0.0, res = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const float pv = probability(trow, v, inv_t, pd);
    const float qv = detail::sanitize_prob(detail::load_as_float(qrow, v));
    mn += std::min(pv, qv);
    res += std::max(0.0f, pv - qv);
  }
  *min_sum = mn;
  *residual_sum = res;
}

}  // namespace DSPARK_ISA_TAG
}  // namespace cpu
}  // namespace dspark

#endif  // DSPARK_CORE_CPU_ROW_OPS_H_

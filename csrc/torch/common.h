// Thin helpers shared by the op glue files: tensor checks with messages that name the argument,
// dtype mapping, and turning a dspark_status into a torch error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "dspark/common.h"

namespace dspark_torch {

inline dspark_dtype to_dspark_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DSPARK_FLOAT32;
    case at::kHalf: return DSPARK_FLOAT16;
    case at::kBFloat16: return DSPARK_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_dtype(const at::Tensor& t, at::ScalarType st, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const at::Device& d, const char* op, const char* name) {
  TORCH_CHECK(t.device() == d, op, ": ", name, " is on ", t.device(), " but the op runs on ", d,
              " (all tensors must be on one device)");
}

inline void check_shape_1d(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
}

// A per-request tensor (temperature, seed, ...): dtype `st`, on `d`, shape [n].
inline void check_per_request(const at::Tensor& t, at::ScalarType st, const at::Device& d, int64_t n, const char* op,
                              const char* name) {
  check_dtype(t, st, op, name);
  check_device(t, d, op, name);
  check_shape_1d(t, n, op, name);
}

// The same for an optional argument (absent is fine).
inline void check_per_request(const std::optional<at::Tensor>& t, at::ScalarType st, const at::Device& d, int64_t n,
                              const char* op, const char* name) {
  if (t.has_value()) check_per_request(*t, st, d, n, op, name);
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Data pointer of an optional tensor, NULL when absent (the C API's "not given").
template <typename T>
inline T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline void throw_on_error(dspark_status st, const char* op) {
  TORCH_CHECK(st == DSPARK_OK, op, " failed (", dspark_status_string(st), "): ", dspark_last_error());
}

}  // namespace dspark_torch

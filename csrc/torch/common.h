// Thin helpers shared by the op glue files: tensor checks with messages that name the argument,
// dtype mapping, and turning a dspark_status into a torch error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

inline void throw_on_error(dspark_status st, const char* op) {
  TORCH_CHECK(st == DSPARK_OK, op, " failed (", dspark_status_string(st), "): ", dspark_last_error());
}

}  // namespace dspark_torch

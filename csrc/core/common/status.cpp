#include "status.h"

namespace dspark {
namespace {
thread_local std::string t_last_error;
}

dspark_status fail(dspark_status status, const std::string& message) {
  t_last_error = message;
  return status;
}

void clear_error() { t_last_error.clear(); }

}  // namespace dspark

extern "C" {

const char* dspark_last_error(void) { return dspark::t_last_error.c_str(); }

const char* dspark_status_string(dspark_status status) {
  switch (status) {
    case DSPARK_OK: return "DSPARK_OK";
    case DSPARK_ERR_INVALID_ARGUMENT: return "DSPARK_ERR_INVALID_ARGUMENT";
    case DSPARK_ERR_UNSUPPORTED: return "DSPARK_ERR_UNSUPPORTED";
    case DSPARK_ERR_CUDA: return "DSPARK_ERR_CUDA";
    case DSPARK_ERR_OUT_OF_MEMORY: return "DSPARK_ERR_OUT_OF_MEMORY";
    case DSPARK_ERR_INTERNAL: return "DSPARK_ERR_INTERNAL";
  }
  return "DSPARK_ERR_UNKNOWN";
}

int dspark_version(void) {
  return DSPARK_VERSION_MAJOR * 10000 + DSPARK_VERSION_MINOR * 100 + DSPARK_VERSION_PATCH;
}

int dspark_has_cuda(void) {
#ifdef DSPARK_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

size_t dspark_dtype_size(dspark_dtype dtype) {
  switch (dtype) {
    case DSPARK_FLOAT32: return 4;
    case DSPARK_FLOAT16: return 2;
    case DSPARK_BFLOAT16: return 2;
  }
  return 0;
}

}  // extern "C"

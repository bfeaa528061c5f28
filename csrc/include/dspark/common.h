/*
 * dspark/common.h: status codes, dtypes and error reporting shared by every dspark_* call.
 *
 * Layering rule: nothing under csrc/include/dspark or csrc/core includes a torch or Python
 * header. The torch glue (csrc/torch) and the Python package sit on top of this C API, and C++
 * engines can link libdspark_core directly.
 *
 * Conventions of every op in this API:
 *  - Each op takes one plain parameter struct (`dspark_<op>_params`), zero-initialise it and fill
 *    the fields; pointers are device pointers for the CUDA entry point and host pointers for the
 *    CPU one. Shapes are given in each field's comment; "[R]" means R contiguous elements.
 *  - Each op returns a dspark_status. On anything but DSPARK_OK, dspark_last_error() returns a
 *    message (thread-local, valid until the next failing call on this thread) that names the
 *    offending field and what was expected.
 *  - Argument checks that need no device data (null pointers, sizes, dtypes) are done before any
 *    work starts; nothing is written on error. Values that live on the device (token ids,
 *    temperatures, offsets) are validated inside the kernels, which give a documented result for
 *    hostile values instead of reading out of bounds.
 */
#ifndef DSPARK_COMMON_H_
#define DSPARK_COMMON_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DSPARK_API __declspec(dllexport)
#else
#define DSPARK_API __attribute__((visibility("default")))
#endif

#define DSPARK_VERSION_MAJOR 0
#define DSPARK_VERSION_MINOR 1
#define DSPARK_VERSION_PATCH 0

typedef enum dspark_status {
  DSPARK_OK = 0,
  DSPARK_ERR_INVALID_ARGUMENT = 1, /* a field is null, out of range or inconsistent */
  DSPARK_ERR_UNSUPPORTED = 2,      /* valid request this build cannot serve (e.g. CUDA not built) */
  DSPARK_ERR_CUDA = 3,             /* a CUDA runtime call or kernel launch failed */
  DSPARK_ERR_OUT_OF_MEMORY = 4,    /* a host allocation failed */
  DSPARK_ERR_INTERNAL = 5          /* a bug: please report it with dspark_last_error() */
} dspark_status;

typedef enum dspark_dtype {
  DSPARK_FLOAT32 = 0,
  DSPARK_FLOAT16 = 1,
  DSPARK_BFLOAT16 = 2
} dspark_dtype;

/* Message of the last failing call on this thread ("" if none). Never NULL. */
DSPARK_API const char* dspark_last_error(void);

/* Static name of a status code, e.g. "DSPARK_ERR_INVALID_ARGUMENT". Never NULL. */
DSPARK_API const char* dspark_status_string(dspark_status status);

/* Library version as major * 10000 + minor * 100 + patch. */
DSPARK_API int dspark_version(void);

/* 1 if this build of libdspark_core contains the CUDA kernels, else 0. */
DSPARK_API int dspark_has_cuda(void);

/* Size in bytes of one element of `dtype` (0 for an unknown value). */
DSPARK_API size_t dspark_dtype_size(dspark_dtype dtype);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_COMMON_H_ */

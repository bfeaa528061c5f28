// Internal: setting the thread-local error message behind dspark_last_error().
#ifndef DSPARK_CORE_COMMON_STATUS_H_
#define DSPARK_CORE_COMMON_STATUS_H_

#include <string>

#include "dspark/common.h"

namespace dspark {

// Records `message` for dspark_last_error() and returns `status`, so checks read
// `return fail(DSPARK_ERR_INVALID_ARGUMENT, "...")`.
dspark_status fail(dspark_status status, const std::string& message);

// Clears the message (called at the start of each entry point).
void clear_error();

}  // namespace dspark

// Returns early with DSPARK_ERR_INVALID_ARGUMENT and `msg` unless `cond` holds.
#define DSPARK_CHECK_ARG(cond, msg)                                      \
  do {                                                                   \
    if (!(cond)) return ::dspark::fail(DSPARK_ERR_INVALID_ARGUMENT, msg); \
  } while (0)

#endif  // DSPARK_CORE_COMMON_STATUS_H_

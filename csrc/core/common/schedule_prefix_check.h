// Internal: host-side argument checks of dspark_schedule_prefix_params shared by both entry points
// (defined in cpu/schedule_prefix.cpp, which every build of the op compiles).
#ifndef DSPARK_CORE_COMMON_SCHEDULE_PREFIX_CHECK_H_
#define DSPARK_CORE_COMMON_SCHEDULE_PREFIX_CHECK_H_

#include "dspark/schedule_prefix.h"

namespace dspark {

// Checks everything that needs no device data. Sets dspark_last_error() on failure.
dspark_status check_schedule_prefix_params(const dspark_schedule_prefix_params* p);

}  // namespace dspark

#endif

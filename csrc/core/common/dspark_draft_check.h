// Internal: host-side argument checks of dspark_dspark_draft_params shared by both entry points
// (defined in cpu/dspark_draft.cpp, which every build of the op compiles).
#ifndef DSPARK_CORE_COMMON_DSPARK_DRAFT_CHECK_H_
#define DSPARK_CORE_COMMON_DSPARK_DRAFT_CHECK_H_

#include "dspark/dspark_draft.h"

namespace dspark {

// Checks everything that needs no device data. Sets dspark_last_error() on failure.
dspark_status check_dspark_draft_params(const dspark_dspark_draft_params* p, bool need_out_logits);

}  // namespace dspark

#endif

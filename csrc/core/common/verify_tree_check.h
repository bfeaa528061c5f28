// Internal: host-side argument checks of verify_tree / kv_compact shared by the CPU and CUDA entry
// points (defined in csrc/core/cpu/{verify_tree,kv_compact}.cpp).
#ifndef DSPARK_CORE_COMMON_VERIFY_TREE_CHECK_H_
#define DSPARK_CORE_COMMON_VERIFY_TREE_CHECK_H_

#include "dspark/kv_compact.h"
#include "dspark/verify_tree.h"

namespace dspark {

// Everything that needs no device data. Set dspark_last_error() on failure.
dspark_status check_verify_tree_params(const dspark_verify_tree_params* p);
dspark_status check_kv_compact_params(const dspark_kv_compact_params* p);

}  // namespace dspark

#endif

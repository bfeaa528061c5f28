// Internal: host-side argument checks of dspark_verify_chain_params shared by both entry points.
#ifndef DSPARK_CORE_COMMON_VERIFY_CHAIN_CHECK_H_
#define DSPARK_CORE_COMMON_VERIFY_CHAIN_CHECK_H_

#include "dspark/verify_chain.h"

namespace dspark {

// Checks everything that needs no device data. Sets dspark_last_error() on failure.
dspark_status check_verify_chain_params(const dspark_verify_chain_params* p);

}  // namespace dspark

#endif

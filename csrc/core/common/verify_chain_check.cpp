#include "verify_chain_check.h"

#include "status.h"

namespace dspark {

static bool valid_dtype(dspark_dtype d) {
  return d == DSPARK_FLOAT32 || d == DSPARK_FLOAT16 || d == DSPARK_BFLOAT16;
}

dspark_status check_verify_chain_params(const dspark_verify_chain_params* p) {
  DSPARK_CHECK_ARG(p != nullptr, "verify_chain: params is NULL");
  DSPARK_CHECK_ARG(p->num_requests >= 0, "verify_chain: num_requests must be >= 0");
  if (p->num_requests == 0) return DSPARK_OK;
  DSPARK_CHECK_ARG(p->vocab_size >= 1, "verify_chain: vocab_size must be >= 1");
  DSPARK_CHECK_ARG(p->max_drafts >= 0, "verify_chain: max_drafts must be >= 0");
  DSPARK_CHECK_ARG(p->cu_target_rows != nullptr, "verify_chain: cu_target_rows is NULL (expected [R+1] int64)");
  DSPARK_CHECK_ARG(p->target_logits != nullptr, "verify_chain: target_logits is NULL (expected [N, V])");
  DSPARK_CHECK_ARG(valid_dtype(p->target_dtype), "verify_chain: target_dtype must be FLOAT32, FLOAT16 or BFLOAT16");
  DSPARK_CHECK_ARG(p->target_row_stride >= p->vocab_size,
                   "verify_chain: target_row_stride must be >= vocab_size");
  DSPARK_CHECK_ARG(p->draft_kind == DSPARK_DRAFT_ONE_HOT || p->draft_kind == DSPARK_DRAFT_LOGITS ||
                       p->draft_kind == DSPARK_DRAFT_PROBS,
                   "verify_chain: draft_kind must be ONE_HOT, LOGITS or PROBS");
  if (p->draft_kind != DSPARK_DRAFT_ONE_HOT) {
    DSPARK_CHECK_ARG(p->draft != nullptr, "verify_chain: draft is NULL but draft_kind is LOGITS or PROBS");
    DSPARK_CHECK_ARG(valid_dtype(p->draft_dtype), "verify_chain: draft_dtype must be FLOAT32, FLOAT16 or BFLOAT16");
    DSPARK_CHECK_ARG(p->draft_row_stride >= p->vocab_size, "verify_chain: draft_row_stride must be >= vocab_size");
  }
  DSPARK_CHECK_ARG(p->temperature != nullptr, "verify_chain: temperature is NULL (expected [R] float32)");
  DSPARK_CHECK_ARG(p->out_tokens != nullptr, "verify_chain: out_tokens is NULL (expected [R, max_drafts + 1] int64)");
  DSPARK_CHECK_ARG(p->out_num_accepted != nullptr, "verify_chain: out_num_accepted is NULL (expected [R] int64)");
  DSPARK_CHECK_ARG((p->seed == nullptr) == (p->offset == nullptr),
                   "verify_chain: seed and offset must both be given or both be NULL");
  return DSPARK_OK;
}

}  // namespace dspark

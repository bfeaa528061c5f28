"""Typed Python wrappers of the fused ops, with their fake (meta) kernels for torch.compile.

One module per op, named like the op; each wraps one ``torch.ops.dspark.<name>`` schema whose CPU
and CUDA kernels are registered from ``csrc/torch/<name>.cpp``. The wrappers only normalise
arguments (scalars -> per-request tensors) and document shapes. Pure-PyTorch references with
identical semantics live in :mod:`dspark_native.reference`.
"""

from .dspark_draft import DSparkDraftOutput, dspark_draft  # noqa: F401
from .kv_compact import KVCompactOutput, kv_commit_chain, kv_compact  # noqa: F401
from .schedule_prefix import ScheduleOutput, schedule_prefix  # noqa: F401
from .target_forward import (  # noqa: F401
    inject_context,
    pack_gate_up_panels,
    pack_panels,
    target_forward,
    target_forward_isa,
)
from .verify_chain import DRAFT_LOGITS, DRAFT_ONE_HOT, DRAFT_PROBS, VerifyChainOutput, verify_chain  # noqa: F401
from .verify_tree import VerifyTreeOutput, verify_tree  # noqa: F401

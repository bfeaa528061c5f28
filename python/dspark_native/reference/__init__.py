"""Pure-PyTorch references of every fused op: the executable specification the kernels are tested
against, and a fallback where the extension is missing. One module per op, named like the op;
:mod:`.sampling` holds the conventions they share (Philox counters, tie rules, inverse-CDF draws).
They follow the kernels exactly, so the same (seed, offset) gives the same tokens up to
floating-point ties. They favour clarity over speed.
"""

from .dspark_draft import dspark_draft_reference  # noqa: F401
from .kv_compact import kv_compact_reference  # noqa: F401
from .sampling import *  # noqa: F401,F403
from .schedule_prefix import schedule_prefix_reference  # noqa: F401
from .target_forward import inject_context_reference, target_forward_reference  # noqa: F401
from .verify_chain import verify_chain_reference  # noqa: F401
from .verify_tree import verify_tree_reference  # noqa: F401

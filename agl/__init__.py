"""agl: AlignGuard-LoRA as a fast PyTorch extension.

Importing `agl` loads the compiled kernels (``agl._C``) when they were built for the running torch; the
pure-PyTorch reference works without them.
"""
from __future__ import annotations

from agl import _load  # noqa: F401  (checks the build against the running torch, registers the ops)
from agl.functional import AGLTerms, agl_terms

__version__ = "0.1.0"

__all__ = ["AGLTerms", "agl_terms", "AlignmentState", "AGLConfig", "AGLLoss", "AGLLoggingCallback", "BudgetController",
           "estimate_alignment_state", "ShardedAlignmentState", "hf", "__version__"]


def __getattr__(name):  # lazy: keeps `import agl` light (transformers/peft load only when needed)
    if name in ("AlignmentState", "estimate_alignment_state"):
        from agl import fisher

        return getattr(fisher, name)
    if name == "ShardedAlignmentState":
        from agl import sharded_state

        return sharded_state.ShardedAlignmentState
    if name == "AGLConfig":
        from agl.config import AGLConfig

        return AGLConfig
    if name in ("AGLLoss", "AGLLoggingCallback"):
        from agl import loss

        return getattr(loss, name)
    if name == "BudgetController":
        from agl.budget import BudgetController

        return BudgetController
    if name == "hf":  # `agl.hf.attach(trainer, state)`: imports transformers
        import agl.hf

        return agl.hf
    raise AttributeError(f"module 'agl' has no attribute {name!r}")

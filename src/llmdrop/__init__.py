"""llmdrop: measure how redundant each block, attention and MLP sublayer of a decoder LLM is, and remove them for real.

Importing the package is cheap; the heavy modules load when a function is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "checkpoint",
    "save": "checkpoint",
    "load_model": "models",
    "load_calibration": "calibration",
    "measure": "measure",
    "Scores": "measure",
    "DropPlan": "plan",
    "plan_drops": "plan",
    "iterative_drops": "plan",
    "apply_plan": "surgery",
    "perplexity": "evaluate",
    "evaluate_tasks": "evaluate",
    "run_bench": "bench",
    "StudyConfig": "study",
    "run_study": "study",
    "check_claims": "claims",
    "LlmdropError": "errors",
    "arch_for": "arch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llmdrop' has no attribute {name!r}")

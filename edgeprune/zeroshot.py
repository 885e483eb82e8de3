"""Zero-shot multiple-choice accuracy through lm-eval, fully offline, from the local datasets in ``data_dir()``.

The task YAMLs in ``edgeprune/tasks/`` mirror lm-eval 0.4.13's own task YAMLs (same prompts, same choices,
same scoring); only the data source differs: ``dataset_path: json`` on the local files listed in
``TASK_FILES``. At run time the YAMLs (and ``utils.py``) are copied into a temporary directory with the
absolute data path substituted for ``@DATA_FILE@`` and registered with ``TaskManager(include_path=...,
include_defaults=False)``. The model is wrapped with ``HFLM(pretrained=<model object>, tokenizer=<tokenizer>)``,
so lm-eval tokenizes exactly as it would for a hub model (LLaMA tokenizers add BOS; the context/continuation
split is lm-eval's ``_encode_pair``).

Metrics (lm-eval definitions): ``acc`` = argmax of the summed continuation log-likelihood;
``acc_norm`` = argmax of log-likelihood divided by the continuation's length in characters.
Which metric is *the* score of each task (``PRIMARY_METRIC``), as commonly reported in pruning papers
(LLM-Pruner, SliceGPT, Wanda tables via lm-eval):

- acc_norm: arc_challenge, arc_easy, openbookqa, piqa, hellaswag
- acc:      boolq, winogrande (lm-eval defines no acc_norm for these)

``average`` in the result is the mean of each run task's primary metric.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EdgepruneError
from .paths import data_dir

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: data file(s) per task, relative to ``data_dir()``; the first that exists is used.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "boolq": ("boolq/val.jsonl",),
    "piqa": ("piqa/valid.jsonl",),
    "winogrande": ("winogrande/dev.llmfoundry.jsonl",),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "openbookqa": ("openbookqa/test.llmfoundry.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", "hellaswag/valid.jsonl", "hellaswag/val.jsonl",
                  "hellaswag/validation.jsonl", "hellaswag/hellaswag.jsonl", "hellaswag/*.jsonl"),
}

#: extra files a task needs besides its main data file.
TASK_EXTRA_FILES: dict[str, tuple[str, ...]] = {"piqa": ("piqa/valid-labels.lst",)}

#: the metric reported (and averaged) for each task.
PRIMARY_METRIC: dict[str, str] = {
    "boolq": "acc",
    "winogrande": "acc",
    "piqa": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "hellaswag": "acc_norm",
}

#: the six tasks whose data ships in shared/data (hellaswag only when its folder is present).
DEFAULT_TASKS: tuple[str, ...] = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

_OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def available_tasks() -> list[str]:
    """Task names whose data files exist under ``data_dir()``."""
    return [t for t in TASK_FILES if _find_data_file(t) is not None]


def _find_data_file(task: str) -> Path | None:
    try:
        root = data_dir()
    except EdgepruneError:
        return None
    for rel in TASK_FILES[task]:
        if "*" in rel:
            hits = sorted(root.glob(rel))
            if len(hits) == 1:
                return hits[0].resolve()
        elif (root / rel).is_file():
            return (root / rel).resolve()
    return None


def _check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks or [])
    if not tasks:
        raise EdgepruneError(f"no zero-shot tasks given; valid names: {', '.join(TASK_FILES)}")
    unknown = [t for t in tasks if t not in TASK_FILES]
    if unknown:
        raise EdgepruneError(f"unknown zero-shot task(s) {', '.join(map(str, unknown))}; valid names: "
                             f"{', '.join(TASK_FILES)}")
    if len(set(tasks)) != len(tasks):
        raise EdgepruneError(f"zero-shot task list has duplicates: {', '.join(tasks)}")
    root = data_dir()
    for t in tasks:
        if _find_data_file(t) is None:
            raise EdgepruneError(f"data for zero-shot task {t} not found (looked for {' or '.join(TASK_FILES[t])} "
                                 f"under {root}); set EDGEPRUNE_DATA or drop the task")
        for rel in TASK_EXTRA_FILES.get(t, ()):
            if not (root / rel).is_file():
                raise EdgepruneError(f"data for zero-shot task {t} incomplete: {root / rel} is missing")
    return tasks


def _write_task_dir(tasks: list[str], out: Path) -> None:
    shutil.copy(TASKS_DIR / "utils.py", out / "utils.py")
    for t in tasks:
        text = (TASKS_DIR / f"{t}.yaml").read_text()
        path = str(_find_data_file(t))
        if "@DATA_FILE@" not in text:
            raise EdgepruneError(f"internal: task yaml {t}.yaml has no @DATA_FILE@ placeholder")
        # JSON string escaping is valid YAML double-quoted string escaping.
        text = text.replace('"@DATA_FILE@"', json.dumps(path))
        (out / f"{t}.yaml").write_text(text)


@contextlib.contextmanager
def _offline():
    """Set the HF offline switches (env vars and the already-imported module constants), restore afterwards."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved = [(datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in saved if hasattr(mod, name)]
    os.environ.update(_OFFLINE_ENV)
    for mod, name, _ in saved:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, v in saved:
            setattr(mod, name, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_logs():
    import datasets.utils.logging as dlog

    names = ["lm_eval", "lm-eval", "datasets"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    bars = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            dlog.enable_progress_bar()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _run(model, tokenizer, tasks, limit, batch_size, log_samples: bool = False) -> dict:
    """Run lm-eval; return its raw result dict (``results``, ``n-samples`` and, if asked, ``samples``)."""
    tasks = _check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EdgepruneError(f"limit must be a positive integer number of docs per task or None, not {limit!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EdgepruneError(f"batch_size must be a positive integer, not {batch_size!r}")
    with _offline(), _quiet_logs(), tempfile.TemporaryDirectory(prefix="edgeprune-tasks-") as tmp:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        _write_task_dir(tasks, Path(tmp))
        was_training = model.training
        model.eval()
        try:
            # HFLM sets a pad token on the tokenizer it is given: hand it a copy, not the caller's.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            tm = TaskManager(include_path=tmp, include_defaults=False)
            out = simple_evaluate(
                model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=None,
                bootstrap_iters=0, log_samples=log_samples, cache_requests=False,
                # leave the caller's global RNG state alone (zero-shot needs no sampling)
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )
        finally:
            model.train(was_training)
    if out is None:
        raise EdgepruneError("internal: lm-eval returned no results")
    return out


def _summarise(out: dict, tasks: list[str]) -> dict:
    res: dict = {}
    for t in tasks:
        r = out["results"][t]
        entry = {"acc": float(r["acc,none"])}
        if "acc_norm,none" in r:
            entry["acc_norm"] = float(r["acc_norm,none"])
        entry["n"] = int(out["n-samples"][t]["effective"])
        res[t] = entry
    res["average"] = sum(res[t][PRIMARY_METRIC[t]] for t in tasks) / len(tasks)
    return res


def evaluate_zeroshot(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names from ``TASK_FILES``), offline from ``data_dir()``.

    Returns ``{task: {"acc": .., "acc_norm": .. (tasks that define it), "n": docs scored}, ..., "average": ..}``
    where ``average`` is the mean over the tasks of ``PRIMARY_METRIC[task]`` (acc_norm for arc_*, openbookqa,
    piqa, hellaswag; acc for boolq, winogrande). ``limit`` scores only the first N docs of each task.
    Nothing is downloaded: the HF offline switches are set for the duration of the call.
    Raises :class:`EdgepruneError` for an unknown task name or missing data.
    """
    tasks = _check_tasks(tasks)
    out = _run(model, tokenizer, tasks, limit, batch_size)
    return _summarise(out, tasks)

"""Evaluation through lm-evaluation-harness (the optional `lmforge[eval]` extra): the `lmforge` model adapter,
the tasks lmforge ships, and the runner `lmforge eval --tasks` uses. Importing this registers the adapter with
lm-eval under the name "lmforge"."""

from lmforge.evals.harness import (
    TASKS_DIR,
    LmforgeLM,
    build_task_manager,
    evaluate_tasks,
    results_table,
    shipped_tasks,
    task_scores,
)

__all__ = ["TASKS_DIR", "LmforgeLM", "build_task_manager", "evaluate_tasks", "results_table", "shipped_tasks",
           "task_scores"]

"""Zero-shot evaluation through lm-evaluation-harness, on the compressed model itself.

The model object (packed layers and all) is handed to the harness's ``HFLM`` wrapper, so the
scores are those of the artifact that will be served. On offline machines, point
``include_path`` at a folder of task YAML files whose ``dataset_path``/``dataset_kwargs`` name
local files (e.g. ``dataset_path: json`` with ``data_files``), and set ``HF_DATASETS_OFFLINE=1``
so that nothing tries the network.
"""
from __future__ import annotations


def zero_shot(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
              batch_size: int = 8, num_fewshot: int = 0) -> dict:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on ``model``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("zero-shot evaluation needs lm-evaluation-harness: pip install 'zssvd[eval]'") from err
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; for local tasks pass --include-path with their YAML files")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}

"""Zero-shot scores of a checkpoint through EleutherAI's lm-evaluation-harness (``megatron-bottleneck eval``).

:func:`harness_model` wraps a :class:`~megatron_bottleneck.evaluate.scorer.CheckpointScorer` and the
checkpoint's text tokenizer as an lm-eval ``LM`` (0.4.x): ``loglikelihood`` (multiple-choice tasks) and
``loglikelihood_rolling`` (perplexity tasks); generative tasks (``generate_until``) are refused in one line.
A request ``(context, continuation)`` is tokenised as lm-eval's HuggingFace model does: trailing spaces of the
context move to the continuation, the continuation's ids are those of ``context + continuation`` after the
context's own ids.

:func:`evaluate_checkpoint` runs ``lm_eval.simple_evaluate`` and writes its results dict (``samples`` left
out, made JSON-serialisable as lm-eval's CLI does) to ``<out>/results.json``. Default ``out``:
``<run_dir>/eval`` when the checkpoint lies inside a run directory (one holding ``run.json`` or
``logs/config.yaml``, what ``megatron-bottleneck report`` reads), else ``<checkpoint.dir>/eval``.
lm-eval is the ``[eval]`` extra, imported only here.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from ..base.device import choose_device
from ..base.errors import ConfigError
from .scorer import checkpoint_config, checkpoint_tokenizer, open_checkpoint, resolve_checkpoint
from .tasks import DEFAULT_TASKS, EVAL_DIR, RESULTS

__all__ = ["harness_model", "evaluate_checkpoint", "default_eval_dir"]
INSTALL = "zero-shot evaluation needs lm-eval 0.4: pip install 'megatron-bottleneck[eval]'"


def _lm_eval():
    try:  # optional dependency: the [eval] extra
        import lm_eval
        from lm_eval.api.model import LM  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None
    return lm_eval


def harness_model(scorer, tokenizer):
    """An lm-eval ``LM`` scoring with ``scorer`` on the ids of ``tokenizer`` (``encode(list of str)``)."""
    _lm_eval()
    from lm_eval.api.model import LM

    class MegatronCheckpointLM(LM):
        """One of our checkpoints as an lm-eval model (log-likelihood tasks)."""

        def __init__(self):
            super().__init__()
            self.scorer, self.tokenizer = scorer, tokenizer

        def _encode(self, text: str) -> List[int]:
            return self.tokenizer.encode([text])[0] if text else []

        def _pair(self, context: str, continuation: str):
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self._encode(context)
            whole = self._encode(context + continuation)
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self._encode(continuation)
            return ctx, cont

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([self._pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling_many([self._encode(r.args[0]) for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            task = getattr(requests[0], "task_name", None) if requests else None
            raise ConfigError(f"task {task or '?'} is generative (generate_until): eval scores log-likelihood "
                              "tasks only (multiple choice, perplexity); leave it out of --tasks")

    return MegatronCheckpointLM()


def _run_dir(path: str) -> Optional[str]:
    d = os.path.abspath(path)
    while True:
        if os.path.exists(os.path.join(d, "run.json")) or os.path.exists(os.path.join(d, "logs", "config.yaml")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def default_eval_dir(checkpoint: str) -> str:
    """``<run_dir>/eval`` for a checkpoint inside a run directory, else ``<checkpoint.dir>/eval``."""
    ckpt = resolve_checkpoint(checkpoint)
    run = _run_dir(ckpt)
    return os.path.join(run if run else os.path.dirname(os.path.abspath(ckpt)), EVAL_DIR)


def _task_manager(tasks: Sequence[str], include_path: Optional[str]):
    """An lm-eval TaskManager that knows ``tasks``: the ``include_path`` tasks alone when they cover them
    (indexing lm-eval's own thousands of task files takes seconds), else those plus lm-eval's."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not os.path.isdir(include_path):
            raise ConfigError(f"--include-path {include_path!r} is not a directory of lm-eval task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}: see `lm_eval --tasks list`, or define the task in a "
                          "YAML file under --include-path DIR")
    return manager


def evaluate_checkpoint(checkpoint: str, tasks: Sequence[str] = DEFAULT_TASKS, out_dir: Optional[str] = None,
                        batch_size: int = 8, device: str = "auto", limit: Optional[float] = None,
                        include_path: Optional[str] = None, tokenizer: Optional[str] = None,
                        num_fewshot: int = 0) -> Dict:
    """Score ``checkpoint`` on lm-eval ``tasks`` (zero-shot by default) and write ``<out_dir>/results.json``;
    returns the results dict with ``path`` added. ``device``: auto | cpu | cuda | cuda:N (see
    :func:`~megatron_bottleneck.evaluate.scorer.open_checkpoint`), checked first: a GPU asked for and absent is
    one :class:`~megatron_bottleneck.base.errors.DeviceError` line."""
    choose_device(device)
    lm_eval = _lm_eval()
    from lm_eval.utils import handle_non_serializable

    ckpt = resolve_checkpoint(checkpoint)
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ConfigError("--tasks is empty: name lm-eval tasks, e.g. --tasks hellaswag,arc_easy")
    cfg = checkpoint_config(ckpt)
    tok = checkpoint_tokenizer(cfg, tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.model.vocab_size}: "
                          "pass the --tokenizer the checkpoint's data was tokenised with")
    manager = _task_manager(tasks, include_path)
    out_dir = out_dir or default_eval_dir(ckpt)
    with open_checkpoint(ckpt, device=device, batch_size=batch_size, eod=tok.eod) as (scorer, cfg):
        results = lm_eval.simple_evaluate(model=harness_model(scorer, tok), tasks=tasks, num_fewshot=num_fewshot,
                                          batch_size=batch_size, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=0)
    results.pop("samples", None)
    m = cfg.model
    results["megatron_bottleneck"] = {"checkpoint": os.path.abspath(ckpt), "head_rank": m.head_rank,
                                      "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
                                      "seq_length": m.seq_length}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    results["path"] = path
    return results


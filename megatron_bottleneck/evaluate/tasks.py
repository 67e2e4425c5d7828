"""Names ``megatron-bottleneck eval`` uses, importable without megatron-core or lm-eval (for ``--help``)."""

# The paper (section 5) reports "zero-shot downstream scores" of its rank sweep without naming the tasks;
# these are the usual zero-shot suite of its kind (SmolLM2-style small-model evaluations).
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
RESULTS = "results.json"
"""lm-eval's results dict, written as ``<eval dir>/results.json``; the report reads ``<run_dir>/eval/results.json``."""
EVAL_DIR = "eval"

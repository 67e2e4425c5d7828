"""``megatron-bottleneck convert-head``: a trained dense LM head factorised into a rank-r head, written as a trainer
checkpoint that resumes with it.

For the dense head W (``V x D``, vocab-sharded over TP) of a trainer checkpoint (any TP / PP / VPP layout):

1. the job runs one rank per model-parallel rank of the checkpoint (its TP x PP, data-parallel size 1), builds the
   dense model from the checkpoint's ``config.yaml`` and Megatron-Core's optimizer over it as the trainer does
   (:func:`~megatron_bottleneck.train.trainer.build_optimizer`: distributed or not, the saved DDP buckets), and
   loads both through Megatron-Core's distributed checkpointing
   (:func:`~megatron_bottleneck.train.checkpoint.load_checkpoint`, the optimizer state resharded to data-parallel
   size 1: each rank then holds whole parameters' state);
2. on the last pipeline stage the ``low_rank`` head's ``init=from_dense`` factorises the loaded head: with G = W^T W
   (``D x D``, float64, summed over the vocab shards: :func:`~megatron_bottleneck.heads.low_rank.dense_gram`, which
   reads each shard's rows in blocks) and V_r its top-r eigenvectors, B = V_r^T (``r x D``) and A = W V_r (each
   rank its ``(V/tp) x r`` shard). W_r = A B = W V_r V_r^T is the best rank-r approximation of W (Eckart-Young);
   r = D gives A = W, B = I, the same logits. No rank holds more than its vocab shard of W and one D x D Gram;
3. the low-rank model (every other weight as loaded) gets its own Megatron-Core optimizer; each parameter but the
   head's factors takes the source's state (its fp32 main weight, ``exp_avg``, ``exp_avg_sq`` and ``step``, read
   through :func:`~megatron_bottleneck.train.checkpoint.adam_state`), A and B keep fresh state (Adam moments zero;
   the step count is the others', Megatron-Core's distributed optimizer saving one for all parameters);
4. model and optimizer are saved to ``out`` by the trainer's own save (the source's optimizer format) with the
   checkpoint's step, sample count and learning-rate schedule, ``config.yaml`` naming the low-rank head
   (``model.head_rank = r``, ``checkpoint.dir = out``, ``logging.dir = out/logs``) and ``layout.json`` listing the
   parameters whose optimizer state is fresh (``optimizer_reset_params``), which the resume says in one console
   line. A resume keeps the saved TP / PP with the ``dp_reshardable`` format (any data-parallel size). A source
   without optimizer state (``optimizer_saved: false``) gives a checkpoint without (the resume starts Adam afresh).

A Megatron-LM ``torch_dist`` checkpoint (``--save`` directory or an ``iter_*`` directory, dense untied head, no
virtual pipeline stages) is converted on one rank per model-parallel rank of its saved TP x PP
(:func:`_convert_megatron_lm_rank`: each rank builds its part of the model its saved args describe, as ``measure``
builds it, loads its shards through distributed checkpointing and factorises its vocab shard of the head as above)
and written at that layout as a Megatron-LM checkpoint (``OUT/iter_N`` through ``dist_checkpointing.save``, the
args naming ``--lm-head-rank R``, ``latest_checkpointed_iteration.txt``), without optimizer state; the runner
resumes it with the run's own arguments plus :data:`MEGATRON_LM_RESUME`, Megatron-LM resharding it to the run's
TP / PP at load.

Resume with ``megatron-bottleneck train OUT/iter_N/config.yaml`` (or the run's own config with
``model.head_rank=R checkpoint.dir=OUT``); a longer schedule than the saved one needs ``checkpoint.scheduler``.
Bad input is one line: no checkpoint at the path, a head that is not dense in the checkpoint (Megatron-LM: or tied
to the embedding; saved with virtual pipeline stages), r outside [1, D], another kind than ``low_rank``, an ``out`` that already holds a checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Dict, Optional, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from .base.errors import CheckpointError, HeadConfigError
from .base.head import HeadConfig
from .heads.install import install_head
from .heads.low_rank import validate_head_shape
from .integrations.launch import launch
from .integrations.parallel import initialize_parallel
from .measure.megatron_lm_checkpoint import (build_megatron_lm_model, check_megatron_lm_checkpoint,
                                             load_megatron_lm_weights, read_megatron_lm_common_state)
from .train.checkpoint import (OPTIMIZER_RESET_PARAMS, OPTIMIZER_SAVED, PER_RANK, ensure_optimizer_state,
                               adam_state, latest_checkpoint, load_checkpoint, load_model_only, read_layout,
                               read_saved_state, save_checkpoint)
from .train.config import TrainConfig
from .train.trainer import build_models, build_optimizer, model_layout, run_layout

__all__ = ["convert_head", "ConvertResult"]

ConvertResult = Dict
"""``{"path", "iteration", "rank", "hidden_size", "kept", "kind"}``: the new checkpoint (its ``iter_*``
directory), its step, r, D, the share of the head's squared Frobenius norm the rank-r head keeps (sum of the top-r
eigenvalues of W^T W over its trace) and ``"trainer"`` or ``"megatron-lm"``; for the trainer also
``"optimizer_kept"`` (whether the optimizer state of the non-head parameters was carried over: the source held
one); for Megatron-LM also ``"resume"``, the arguments to add to the run's own (:data:`MEGATRON_LM_RESUME`, with R
and OUT), and the saved ``"tensor_model_parallel_size"`` / ``"pipeline_model_parallel_size"``."""


def _rank_of(head) -> int:
    """r of a ``low_rank`` head spec (``"low_rank:r=256"`` or a HeadConfig); anything else is one line."""
    head = head if isinstance(head, HeadConfig) else HeadConfig.parse(str(head))
    if head.kind != "low_rank":
        raise HeadConfigError(f"--head {head}: convert-head writes a low_rank head (e.g. --head low_rank:r=256)")
    extra = sorted(set(head.options) - {"r", "init"})
    init = str(head.options.get("init", "from_dense"))
    if extra or init != "from_dense" or "r" not in head.options:
        raise HeadConfigError(f"--head {head}: convert-head takes the rank alone (low_rank:r=R); the factors come "
                              "from the SVD of the trained head")
    return head.resolved_options().r


def _trainer_checkpoint(path: str) -> str:
    """The ``iter_*`` directory of a trainer checkpoint at ``path`` (itself, or the one ``latest`` names)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r}: give a trainer checkpoint.dir (holding 'latest') or one of "
                              "its iter_* directories")
    if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isfile(os.path.join(path, "rank_0.pt")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path!r}: expected an iter_* directory with config.yaml or a "
                              "directory with a 'latest' file (the trainer's checkpoint.dir)")
    return latest


def _configs(ckpt: str, rank: int, out: str):
    """``(dense, low_rank)`` configs: the checkpoint's, at its saved precision, and the one the new checkpoint
    holds. The checkpoint's head must be dense and ``rank`` fit it (one line each)."""
    dense = TrainConfig.load(os.path.join(ckpt, "config.yaml"))
    precision = ((read_layout(ckpt) or {}).get("model") or {}).get("train.precision")
    if precision is not None:
        dense.train.precision = precision  # "auto" resolved where it was trained (bf16 on GPUs)
    kind = dense.head_config().kind
    if kind != "dense":
        raise CheckpointError(f"{ckpt}: its head is {kind}"
                              + (f" (model.head_rank={dense.model.head_rank})" if dense.model.head_rank else "")
                              + ": convert-head factorises a dense head (model.head_type dense, no head_rank)")
    m = dense.model
    validate_head_shape(m.hidden_size, m.vocab_size, rank, dense.parallel.tensor_model_parallel_size)
    low = copy.deepcopy(dense)
    low.model.head_type, low.model.head_rank, low.model.head_options = None, rank, {}
    low.model.head_init = "balanced"
    low.checkpoint.dir = out
    low.logging.dir = os.path.join(out, "logs")
    low.validate()
    return dense, low


def _kept_optimizer_state(optimizer, chunks) -> Dict[str, Tuple[torch.Tensor, Dict]]:
    """``{"chunk<i>.<name>": (main, adam_state)}``, cloned, of every parameter but the dense head's
    (``output_layer.*``) in the loaded ``optimizer`` (this rank's, data-parallel size 1: whole parameters)."""
    kept = {}
    for i, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            found = None if name.startswith("output_layer.") else adam_state(optimizer, param)
            if found is not None:
                main, st = found
                kept[f"chunk{i}.{name}"] = (main.detach().clone(),
                                            {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()})
    return kept


def _carry_optimizer_state(optimizer, chunks, kept: Dict) -> list:
    """Give the new optimizer (over ``chunks``, the low-rank model) the source's state for every parameter in
    ``kept`` (main weights, Adam moments, step) and fresh state to the rest, the head's factors: Adam moments
    zero, the step count the others' (Megatron-Core's distributed optimizer saves one count for all parameters).
    Returns the fresh ones' names; a parameter outside the head without saved state is one line."""
    ensure_optimizer_state(optimizer)  # zero moments for every parameter (a step at lr 0 on zero gradients)
    step = next((st["step"] for _, st in kept.values() if torch.is_tensor(st.get("step"))), None)
    fresh = []
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            for name, param in chunk.named_parameters():
                found = adam_state(optimizer, param)
                if found is None:
                    continue
                main, st = found
                key = f"chunk{i}.{name}"
                if key in kept:
                    src_main, src = kept.pop(key)
                    main.copy_(src_main.view_as(main))
                    for k, v in src.items():
                        if torch.is_tensor(v) and torch.is_tensor(st.get(k)) and k != "step":
                            st[k].copy_(v.view_as(st[k]))
                        else:
                            st[k] = v
                    continue
                if not name.startswith("output_layer."):
                    raise CheckpointError(f"the converted model's parameter {key} has no optimizer state in the "
                                          "source checkpoint (only the head's factors are new)")
                for k in ("exp_avg", "exp_avg_sq"):
                    if torch.is_tensor(st.get(k)):
                        st[k].zero_()
                if step is not None:
                    st["step"] = step.clone()
                fresh.append(key)
    if kept:
        raise CheckpointError(f"the source checkpoint's optimizer state for {sorted(kept)[0]} has no parameter in the "
                              "converted model")
    return fresh


def _convert_rank(ckpt: str, rank: int, out: str) -> Tuple[Optional[Tuple[float, float]], Dict]:
    """One rank: load the dense model and its optimizer state, factorise the head (``from_dense``), carry the
    optimizer state of every other parameter into the low-rank model's optimizer, save the checkpoint. Returns
    this rank's ``(||W_shard||_F^2, ||A_shard||_F^2)`` (None off the last stage) and the checkpoint's path and
    step."""
    dense, low = _configs(ckpt, rank, out)
    p = dense.parallel
    initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                        p.virtual_pipeline_model_parallel_size, seed=dense.train.seed)
    saved_layout = read_layout(ckpt) or {}
    with_optimizer = bool(saved_layout.get(OPTIMIZER_SAVED, True))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "gloo"
    run = dense.runtime_options(backend, 1)
    if "ddp_bucket_size" in saved_layout:  # the saved buckets: the dp_reshardable state is laid out by them
        run = dataclasses.replace(run, bucket_size=saved_layout["ddp_bucket_size"])
    tcfg, chunks = build_models(dense)
    kept = {}
    if with_optimizer:
        models, optimizer = build_optimizer(dense, tcfg, chunks, run)
        load_checkpoint(ckpt, chunks, optimizer=optimizer, layout=run_layout(dense, run, models, 1))
        kept = _kept_optimizer_state(optimizer, chunks)
        del models, optimizer
    else:
        load_model_only(ckpt, chunks)
    sums = None
    for chunk in chunks:
        old = getattr(chunk, "output_layer", None)
        if old is None or not chunk.post_process:
            continue
        w_sq = float(torch.linalg.vector_norm(old.weight.detach(), dtype=torch.float64) ** 2)
        install_head(chunk, HeadConfig("low_rank", {"r": rank, "init": "from_dense"}, seed=dense.train.seed))
        # ||A||_F^2 = ||W V_r||_F^2 = sum of the top-r eigenvalues of W^T W (this shard's part)
        sums = (w_sq, float(torch.linalg.vector_norm(chunk.output_layer.weight.detach(), dtype=torch.float64) ** 2))
    low_tcfg, low_chunks = build_models(low)
    for src, dst in zip(chunks, low_chunks):
        dst.load_state_dict(src.state_dict(), strict=True)
    del chunks
    extra = read_saved_state(ckpt)
    extra.pop(PER_RANK, None)  # the RNG of another layout: a resume seeds afresh
    if with_optimizer:
        low_models, low_optimizer = build_optimizer(low, low_tcfg, low_chunks, run)
        fresh = _carry_optimizer_state(low_optimizer, low_chunks, kept)
        fresh = _all_names(fresh)
        layout = {**saved_layout, **run_layout(low, run, low_models, 1), OPTIMIZER_RESET_PARAMS: fresh}
        path = save_checkpoint(out, extra["iteration"], low_chunks, extra, low, keep_last=0, optimizer=low_optimizer,
                               layout=layout)
    else:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        layout = {**saved_layout, "world_size": world, "data_parallel_size": 1, "ddp_buckets": None,
                  "tensor_model_parallel_size": p.tensor_model_parallel_size,
                  "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                  "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
                  "distributed_optimizer": p.distributed_optimizer,
                  "model": model_layout(low), OPTIMIZER_SAVED: False}
        path = save_checkpoint(out, extra["iteration"], low_chunks, extra, low, keep_last=0, layout=layout)
    first_tp = ps.get_data_parallel_rank() == 0
    return (sums if first_tp else None), {"path": path, "iteration": extra["iteration"],
                                          "optimizer_kept": with_optimizer}


def _all_names(names: list) -> list:
    """The union of every rank's ``names`` (each pipeline stage holds its own parameters), sorted."""
    if not torch.distributed.is_initialized():
        return sorted(names)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, list(names))
    return sorted({n for part in every for n in part})


def convert_head(checkpoint: str, head, out: str, *, device: Optional[str] = "auto") -> ConvertResult:
    """Factorise the dense head of the trainer or Megatron-LM ``torch_dist`` checkpoint at ``checkpoint`` into the
    ``low_rank`` head ``head`` (``"low_rank:r=256"``, a :class:`~megatron_bottleneck.base.head.HeadConfig`) and save
    it under ``out`` (see the module docstring); on the checkpoint's TP x PP local ranks on ``device`` (auto: one GPU per rank when visible, else CPU ranks). Returns a :data:`ConvertResult`."""

    rank = _rank_of(head)
    if _is_megatron_lm(checkpoint):
        return _convert_megatron_lm(checkpoint, rank, out, device)
    ckpt = _trainer_checkpoint(checkpoint)
    dense, _low = _configs(ckpt, rank, out)
    if latest_checkpoint(out) is not None or os.path.abspath(out) == os.path.abspath(os.path.dirname(ckpt)):
        raise CheckpointError(f"--out {out} already holds a checkpoint: give an empty or new directory")
    p = dense.parallel
    world = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    results = launch(functools.partial(_convert_rank, ckpt, rank, out), world, timeout=3600, device=device)
    parts = [r[0] for r in results if r[0] is not None]
    total, kept = sum(s[0] for s in parts), sum(s[1] for s in parts)
    info = results[0][1]
    return {"path": info["path"], "iteration": info["iteration"], "rank": rank, "hidden_size": dense.model.hidden_size,
            "kept": kept / total if total > 0 else 1.0, "kind": "trainer", "optimizer_kept": info["optimizer_kept"]}


# ------------------------------------------------------------------------------------------ Megatron-LM
MEGATRON_LM_RESUME = "--lm-head-rank {rank} --load {out} --no-load-optim"
"""What a Megatron-LM run adds to its own arguments to resume a converted checkpoint (through
``python -m megatron_bottleneck.megatron_lm pretrain_gpt.py ...``). ``--no-load-optim``: the checkpoint holds no
optimizer state (Megatron-LM stops with a KeyError without it) and Megatron-LM then also starts its learning-rate
schedule afresh; the RNG state is not saved either, which the saved args say (``no_save_rng``), so Megatron-LM
skips it without ``--no-load-rng``."""


def _is_megatron_lm(path: str) -> bool:
    """A Megatron-LM checkpoint: its tracker file, or a torch_dist ``iter_*`` directory without our config.yaml."""
    if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        return True
    return os.path.isfile(os.path.join(path, "metadata.json")) and not os.path.isfile(os.path.join(path, "config.yaml"))


def _megatron_lm_layout(args) -> Tuple[int, int]:
    """The saved ``(TP, PP)`` of a Megatron-LM checkpoint (its args); virtual pipeline stages are one line."""
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vpp:
        raise CheckpointError(f"saved with virtual pipeline stages (--virtual-pipeline-model-parallel-size {vpp}, "
                              "or --num-layers-per-virtual-pipeline-stage): convert-head reads Megatron-LM "
                              "checkpoints without them; re-save it without virtual stages first")
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    custom = getattr(args, "pipeline_model_parallel_layout", None)
    if pp > 1 and custom:
        raise CheckpointError(f"saved with --pipeline-model-parallel-layout {custom!r}: convert-head builds Megatron's "
                              "even (or first / last stage) pipeline split; re-save it at PP = 1 first")
    return tp, pp


def _megatron_lm_source(checkpoint: str, rank: int):
    """``(iter_dir, args)`` of a Megatron-LM checkpoint whose dense, untied head can take rank ``rank`` (one line
    each otherwise)."""
    iter_dir, args = check_megatron_lm_checkpoint(checkpoint)
    kind = getattr(args, "lm_head_type", None)
    head_rank = getattr(args, "lm_head_rank", None)
    if (kind not in (None, "dense")) or head_rank:
        what = f"--lm-head-type {kind}" if kind not in (None, "dense") else f"--lm-head-rank {head_rank}"
        raise CheckpointError(f"{checkpoint}: saved with {what}: convert-head factorises a dense head (Megatron's "
                              "own output layer)")
    if not getattr(args, "untie_embeddings_and_output_weights", False):
        raise CheckpointError(f"{checkpoint}: its output layer is the input embedding (tied; saved without "
                              "--untie-embeddings-and-output-weights): a low-rank head needs an untied one")
    try:
        tp, _pp = _megatron_lm_layout(args)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from None
    validate_head_shape(int(args.hidden_size), int(args.padded_vocab_size), rank, tp)
    return iter_dir, args


def _convert_megatron_lm(checkpoint: str, rank: int, out: str, device: Optional[str]) -> ConvertResult:
    """convert_head for a Megatron-LM ``torch_dist`` checkpoint: one rank per model-parallel rank of its saved
    TP x PP (see :func:`_convert_megatron_lm_rank`)."""
    iter_dir, args = _megatron_lm_source(checkpoint, rank)
    if os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt")) or (
            os.path.isdir(out) and any(n.startswith("iter_") or n == "release" for n in os.listdir(out))):
        raise CheckpointError(f"--out {out} already holds a checkpoint: give an empty or new directory")
    tp, pp = _megatron_lm_layout(args)
    results = launch(functools.partial(_convert_megatron_lm_rank, iter_dir, rank, out), tp * pp, timeout=3600,
                     device=device)
    parts = [r["sums"] for r in results if r["sums"] is not None]
    total, kept = sum(s[0] for s in parts), sum(s[1] for s in parts)
    info = {k: v for k, v in results[0].items() if k != "sums"}
    return {**info, "kept": kept / total if total > 0 else 1.0, "rank": rank, "hidden_size": int(args.hidden_size),
            "kind": "megatron-lm", "resume": MEGATRON_LM_RESUME.format(rank=rank, out=out),
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}


def _convert_megatron_lm_rank(iter_dir: str, rank: int, out: str) -> Dict:
    """One rank of the checkpoint's saved TP x PP (data-parallel size 1): this rank's part of the GPTModel the
    saved args describe (:func:`~megatron_bottleneck.measure.megatron_lm_checkpoint.build_megatron_lm_model` at
    that layout: its vocabulary shard of the head on the last stage, its stage's layers), its weights loaded
    through Megatron-Core's distributed checkpointing (each rank reads its own shards:
    :func:`~megatron_bottleneck.measure.megatron_lm_checkpoint.load_megatron_lm_weights`); on the last stage the
    dense head W (``V_padded x D``, each TP rank its ``(V_padded/tp) x D`` rows) factorised by ``low_rank``'s
    ``init=from_dense``: G = W^T W (``D x D`` float64, summed over the TP group: ``dense_gram``), V_r its top-r
    eigenvectors, A = W V_r (this rank's rows), B = V_r^T; no rank holds more than its shard and G. Saved with
    ``dist_checkpointing.save`` at the same layout, as Megatron-LM saves it: the model's sharded state dict under
    ``model`` (A is ``output_layer.weight``, ``V_padded x r``; B is ``output_layer.input_proj``, ``r x D``),
    beside the source's common state (iteration, schedule, FLOPs so far, content metadata) with ``args`` recording
    the new head (``lm_head_rank = r``), the layout (the saved TP / PP) and no optimizer / RNG state
    (``no_save_optim``, ``no_save_rng``); the optimizer, RNG and rerun-machine states are left out. Megatron-LM's
    torch_dist load reshards it to the resuming run's TP / PP. Returns ``{"path", "iteration", "sums"}``, sums
    this rank's ``(||W_shard||_F^2, ||A_shard||_F^2)`` (None off the last stage and on DP ranks > 0)."""
    common = read_megatron_lm_common_state(iter_dir)
    args = common["args"]
    tp, pp = _megatron_lm_layout(args)
    initialize_parallel(tp, pp, None, seed=int(getattr(args, "seed", 1234)))
    dtype = (torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False)
             else torch.float32)
    on_gpu = torch.distributed.get_backend() == "nccl"
    model = build_megatron_lm_model(args, int(args.padded_vocab_size), dtype, tp, pp)
    if on_gpu:
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    load_megatron_lm_weights(model, iter_dir, iter_dir)
    sums = None
    if getattr(model, "post_process", True) and getattr(model, "output_layer", None) is not None:
        w_sq = float(torch.linalg.vector_norm(model.output_layer.weight.detach(), dtype=torch.float64) ** 2)
        install_head(model, HeadConfig("low_rank", {"r": rank, "init": "from_dense"},
                                       seed=getattr(args, "seed", None)))
        # ||A_shard||_F^2: this shard's part of the sum of the top-r eigenvalues of W^T W
        sums = (w_sq, float(torch.linalg.vector_norm(model.output_layer.weight.detach(), dtype=torch.float64) ** 2))

    new_args = copy.deepcopy(args)
    new_args.lm_head_rank, new_args.lm_head_type = rank, None
    new_args.lm_head_options = None
    new_args.no_save_optim, new_args.no_save_rng = True, True
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    drop = {"args", "optimizer", "rng_state", "rerun_state_machine", "content_metadata"}  # content: saved anew
    state = {k: v for k, v in common.items() if k not in drop and not str(k).startswith("model")}
    state["args"] = new_args
    state["model"] = model.sharded_state_dict(
        metadata={**(content or {}), "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)})
    name = os.path.basename(os.path.normpath(iter_dir))
    path = os.path.join(out, name)
    first = torch.distributed.get_rank() == 0
    if first:
        os.makedirs(path, exist_ok=False)
    torch.distributed.barrier()
    dist_checkpointing.save(state, path, content_metadata=content)
    tracker = "release" if name == "release" else str(int(common.get("iteration", name.split("_")[-1])))
    if first:
        with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w", encoding="utf-8") as f:
            f.write(tracker)
    torch.distributed.barrier()
    return {"path": path, "iteration": int(common.get("iteration", 0)),
            "sums": sums if ps.get_data_parallel_rank() == 0 else None}

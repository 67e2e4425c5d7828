"""A lean Megatron-Core trainer: GPTModel (dense or low-rank head), Megatron DDP and Megatron's
distributed optimizer (AdamW, state sharded over data-parallel ranks), warmup + cosine schedule,
clipping, micro-batches through Megatron's schedule, validation, the gradient probe, JSONL / TensorBoard /
console logging, atomic checkpoints and exact resume. Data-parallel communication overlaps compute (bucketed
reduce-scatter during backward, the parameter all-gather during forward) and checkpoints are written in the
background, by default (``parallel.overlap_*``, ``checkpoint.async_save``).

Runs under ``torchrun`` or through :func:`run` (local ranks); either way on ``train.device``: NCCL on the GPUs
when visible, gloo on CPU ranks (:func:`~megatron_bottleneck.base.device.resolve_device`).
SIGTERM / SIGUSR1 (slurm preemption) make it save at the end of the current step and return.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.utils import scaled_init_method_normal

from ..base.device import DeviceChoice, choose_device
from ..base.sinks import MetricsLogger
from ..data import IdTokenizer, batches, build_gpt_datasets
from ..heads import FusedLossConfig
from ..integrations.checkpoint_writer import start_writer_helpers
from ..integrations.launch import init_process, launch
from ..integrations.parallel import initialize_parallel
from ..integrations.schedule import StepResult, forward_backward, sync_params
from ..models import build_gpt_model, build_hybrid_model, llama_config
from ..probe import GradientProbe, ProbeConfig
from .checkpoint import (PER_RANK, CheckpointWriter, check_layout, check_optimizer_format, latest_checkpoint,
                         load_checkpoint, read_saved_state, save_checkpoint)
from .config import TrainConfig, fused_wgrad_available
from .lr_schedule import (build_scheduler, check_schedule, restore_schedule, schedule_changes,
                          set_group_learning_rates, warmup_warning)


# model fields a resume may change: they do not change the weights' shapes or meaning
RESUMABLE_MODEL_KEYS = ("init_method_std",)
# model keys at the value every checkpoint saved before they existed had: left out of the layout, so those resume
PRE_HYBRID_DEFAULTS = (("arch", "gpt"), ("hybrid_layer_pattern", None))


class _StopFlag:
    def __init__(self):
        self.signal = None

    def __call__(self, signum, _frame):
        self.signal = signum


def _precision(cfg: TrainConfig) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def _cpu_initialization(cfg: TrainConfig) -> bool:
    """``train.cpu_initialization``; None: on CPU ranks only."""
    ci = cfg.train.cpu_initialization
    return (not torch.cuda.is_available()) if ci is None else ci


def model_layout(cfg: TrainConfig) -> Dict:
    """The ``model`` part of layout.json: every ``model`` field a resume must match, and the precision."""
    model = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()
             if k not in RESUMABLE_MODEL_KEYS and (k, v) not in PRE_HYBRID_DEFAULTS}
    model["train.precision"] = _precision(cfg)
    return model


def build_models(cfg: TrainConfig):
    """Megatron config and model chunks (one per virtual pipeline stage) for this rank."""
    m, p = cfg.model, cfg.parallel
    bf16 = _precision(cfg) == "bf16"
    pattern = cfg.hybrid_pattern()  # model.arch: hybrid (None: gpt); attention and MLP count one layer each
    num_layers = m.num_layers if pattern is None else len(pattern.replace("|", ""))
    # the default hybrid pattern is the gpt model under other names: the same scaled init of the output projections
    same_init = ({"output_layer_init_method": scaled_init_method_normal(m.init_method_std, m.num_layers)}
                 if pattern is not None and m.hybrid_layer_pattern is None else {})
    tcfg = llama_config(
        num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
        use_cpu_initialization=_cpu_initialization(cfg), init_method_std=m.init_method_std,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        gradient_accumulation_fusion=(fused_wgrad_available() if p.gradient_accumulation_fusion is None
                                      else p.gradient_accumulation_fusion),
        **(dict(fp8="hybrid", fp8_recipe=m.fp8) if m.fp8 else {}), **same_init,
    )
    head = cfg.head_config()
    vpp = p.virtual_pipeline_model_parallel_size
    fused = FusedLossConfig(fp8=m.head_fp8) if m.fused_loss else False
    if pattern is not None:
        chunks = [build_hybrid_model(tcfg, m.vocab_size, m.seq_length, hybrid_layer_pattern=pattern, head=head,
                                     vp_stage=(i if vpp else None), real_vocab_size=m.vocab_size, fused_loss=fused)
                  for i in range(vpp or 1)]
    else:
        chunks = [build_gpt_model(tcfg, m.vocab_size, m.seq_length, head=head, vp_stage=(i if vpp else None),
                                  real_vocab_size=m.vocab_size, fused_loss=fused)
                  for i in range(vpp or 1)]
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    return tcfg, chunks


def build_optimizer(cfg: TrainConfig, tcfg, chunks, run):
    """``(models, optimizer)``: ``chunks`` wrapped in Megatron-Core's DistributedDataParallel (fp32 gradient
    buffers, ``run``'s buckets and overlap: :meth:`TrainConfig.runtime_options`) and Megatron-Core's Adam over them
    (``get_megatron_optimizer``; distributed with ``parallel.distributed_optimizer``), as the trainer runs them."""
    bf16 = _precision(cfg) == "bf16"
    dist_opt = cfg.parallel.distributed_optimizer
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt, bucket_size=run.bucket_size,
        overlap_grad_reduce=run.overlap_grad_reduce, overlap_param_gather=run.overlap_param_gather,
        # all-gathers launched by the interleaved schedule, chunk by chunk (Megatron-LM's default with VPP)
        align_param_gather=run.overlap_param_gather and len(chunks) > 1)
    # Bucketing only for the first chunk: the others' communication overlaps compute anyway (Megatron-LM).
    models = [DistributedDataParallel(config=tcfg, ddp_config=ddp, module=c, disable_bucketing=i > 0)
              for i, c in enumerate(chunks)]
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.clip_grad, bf16=bf16, params_dtype=tcfg.params_dtype,
                        use_distributed_optimizer=dist_opt, overlap_param_gather=run.overlap_param_gather),
        models)
    return models, optimizer


def run_layout(cfg: TrainConfig, run, models, dp_size: int) -> Dict:
    """What layout.json records and a resume checks (``checkpoint.check_layout``) for a run of ``cfg`` with
    ``run``'s options (:meth:`TrainConfig.runtime_options`), its DDP-wrapped ``models`` and ``dp_size``
    data-parallel ranks: world size, the parallel sizes, the optimizer kind and state format, the DDP buckets, and
    the model (every ``model`` field, the precision)."""
    p = cfg.parallel
    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "data_parallel_size": dp_size, "distributed_optimizer": p.distributed_optimizer,
            "optimizer_format": cfg.checkpoint.optimizer_format if p.distributed_optimizer else None,
            # the DDP buckets (unpadded sizes): the dp_reshardable optimizer state is laid out by them. Those
            # of the first pipeline stage (what rank 0 writes; other stages hold other parameters: None there)
            "ddp_bucket_size": run.bucket_size,
            "ddp_buckets": ([[b.numel_unpadded for b in buf.buckets] for m in models
                             for buf in m.buffers + m.expert_parallel_buffers]
                            if ps.get_pipeline_model_parallel_rank() == 0 else None),
            "model": model_layout(cfg)}


class Trainer:
    """``Trainer(config, probe=None).train()``; ``on_step(step, record)`` is called after each step."""

    def __init__(self, config: TrainConfig, probe: Optional[GradientProbe] = None,
                 on_step: Optional[Callable[[int, Dict], None]] = None):
        self.cfg = config
        self.on_step = on_step
        self.stop = _StopFlag()
        world = dist.get_world_size() if dist.is_initialized() else 1
        config.check_world(world)
        initialize_parallel(config.parallel.tensor_model_parallel_size,
                            config.parallel.pipeline_model_parallel_size,
                            config.parallel.virtual_pipeline_model_parallel_size, seed=config.train.seed)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        # What overlaps and how checkpoints are written, from the process group's backend (NCCL or gloo).
        self.options = config.runtime_options(dist.get_backend() if dist.is_initialized() else "gloo", self.dp_size)
        t = config.train
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.tcfg, chunks = build_models(config)
        run = self.options
        dist_opt = config.parallel.distributed_optimizer
        self.models, self.optimizer = build_optimizer(config, self.tcfg, chunks, run)
        self._param_sync_ready = False  # Megatron-LM runs the first step without the overlapped all-gather
        self.scheduler = build_scheduler(self.optimizer, config)
        warmup = warmup_warning(config)
        if warmup and (dist.get_rank() if dist.is_initialized() else 0) == 0:
            warnings.warn(warmup, UserWarning, stacklevel=2)
        self.probe = probe
        if self.probe is None and config.probe:
            kw = dict(config.probe)
            kw.setdefault("log_dir", config.logging.dir)
            kw.setdefault("tensorboard", config.logging.tensorboard)
            self.probe = GradientProbe(ProbeConfig(**kw))
        if self.probe is not None:
            self.probe.watch(self.models, num_microbatches=self.num_micro)
        self.iteration = 0
        self.consumed = 0
        self.is_logger = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                          and self.dp_rank == 0)
        self.logger = None
        if self.is_logger:
            self.logger = MetricsLogger(config.logging.dir, "metrics.jsonl", config.logging.tensorboard,
                                        config.logging.wandb_project)
            config.save(os.path.join(config.logging.dir, "config.yaml"))
        self._data()
        self.writer = CheckpointWriter(async_save=run.async_save)
        if config.checkpoint.dir:
            # the format's save works with this megatron-core (refused now, not at the first save)
            check_optimizer_format(config.checkpoint.optimizer_format if dist_opt else None)
            start_writer_helpers()  # before any preemption signal can arrive
        ckpt = latest_checkpoint(config.checkpoint.dir) if config.checkpoint.resume else None
        if ckpt:
            self._restore(ckpt)

    # ---------------------------------------------------------------- data
    def _data(self):
        """megatron-core GPTDatasets (every rank builds; rank 0 writes the index cache first)."""
        cfg = self.cfg
        d = cfg.data
        self.document_samples = cfg.document_samples()
        # eod = pad: GPTDataset then masks no label as padding (the data holds no padding).
        self.train_data, self.valid_data, _ = build_gpt_datasets(
            d.train_prefix or None, d.valid_prefix, None, seq_length=cfg.model.seq_length,
            vocab_size=cfg.model.vocab_size, cache_dir=os.path.join(cfg.logging.dir, "data_cache"),
            seed=cfg.train.seed, split=d.split, tokenizer=IdTokenizer(cfg.model.vocab_size, eod=0, pad=0),
            mock=d.mock, num_samples=cfg.num_samples(), validate=False, document_aligned=self.document_samples)

    def batches(self, split: str = "train", consumed: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        """This data-parallel rank's micro-batches of ``split`` ('train' | 'valid'), starting after
        ``consumed`` samples (global count): the same stream a training run reads."""
        data = self.train_data if split == "train" else self.valid_data
        return batches(data, self.cfg.train.global_batch_size, self.cfg.train.micro_batch_size, consumed,
                       self.dp_rank, self.dp_size, document_aligned=self.document_samples)

    # ---------------------------------------------------------------- steps
    def forward_backward(self, batches: List, forward_only: bool = False) -> StepResult:
        """One global batch (this rank's micro-batches) through Megatron's schedule; gradients reduced; a
        training step is the probe's step (begun and ended around the schedule)."""
        return forward_backward(self.models, batches, forward_only=forward_only,
                                seq_length=self.cfg.model.seq_length,
                                micro_batch_size=self.cfg.train.micro_batch_size,
                                param_sync=forward_only or self._param_sync_ready, probe=self.probe)

    def _train_step(self, stream) -> Dict:
        for m in self.models:
            m.train()
        with warnings.catch_warnings():  # fp32 distributed optimizer: its main params are views (non-leaf)
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            self.optimizer.zero_grad()
        if self.probe is not None:
            self.probe.step = self.iteration
        loss = self.forward_backward([next(stream) for _ in range(self.num_micro)]).loss  # the probe's step too
        _ok, grad_norm, _ = self.optimizer.step()
        self._param_sync_ready = True  # from now on the next forward gathers what the step updated
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed += self.cfg.train.global_batch_size
        return {"loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        for m in self.models:
            m.eval()
        stream = self.batches("valid")
        losses = []
        with torch.no_grad():
            for _ in range(self.cfg.train.eval_iters):
                losses.append(self.forward_backward([next(stream) for _ in range(self.num_micro)], True).loss)
        for m in self.models:
            m.train()
        return None if losses[0] is None else sum(losses) / len(losses)

    # ------------------------------------------------------------ checkpoint
    def _extra_state(self) -> Dict:
        """The same on every rank: step, global sample count, scheduler. Under ``PER_RANK``, this rank's own
        (restored only at the saved layout): RNG states and the probe's accumulation."""
        return {"iteration": self.iteration, "consumed": self.consumed, "scheduler": self.scheduler.state_dict(),
                "probe_step": None if self.probe is None else self.probe.step,
                PER_RANK: {"rng_cpu": torch.get_rng_state(), "rng_tracker": get_cuda_rng_tracker().get_states(),
                           "probe": None if self.probe is None else self.probe.state_dict()}}

    def save(self) -> Optional[str]:
        c = self.cfg.checkpoint
        if not c.dir:
            return None
        sync_params(self.models)  # the modules hold the last step's weights only after the all-gather
        return save_checkpoint(c.dir, self.iteration, [m.module for m in self.models], self._extra_state(),
                               self.cfg, c.keep_last, optimizer=self.optimizer, layout=self.layout(),
                               writer=self.writer)

    def layout(self) -> Dict:
        """What layout.json records and a resume checks: :func:`run_layout` of this run."""
        return run_layout(self.cfg, self.options, self.models, self.dp_size)

    def _restore(self, path: str) -> None:
        layout = self.layout()
        check_layout(path, layout)  # another model is said first
        saved = read_saved_state(path)["scheduler"]  # the same on every rank
        mode = self.cfg.checkpoint.scheduler
        check_schedule(path, saved, self.scheduler, mode)  # checkpoint.scheduler=error: one line, nothing loaded
        changes = schedule_changes(saved, self.scheduler.state_dict())
        # the optimizer's groups hold the saved learning rates while it loads (megatron-core matches them)
        set_group_learning_rates(self.optimizer, self.scheduler.state_dict(), saved)
        extra = load_checkpoint(path, [m.module for m in self.models], optimizer=self.optimizer, layout=layout)
        restore_schedule(self.scheduler, self.optimizer, extra["scheduler"])
        self.iteration, self.consumed = extra["iteration"], extra["consumed"]
        own = extra.get(PER_RANK)
        if own is None and extra["same_layout"]:  # saved before PER_RANK existed
            own = {k: extra[k] for k in ("rng_cpu", "rng_tracker") if k in extra}
        if own:  # the saved layout: this rank's RNG and probe state; otherwise the seeded RNG of a new start
            torch.set_rng_state(own["rng_cpu"])
            get_cuda_rng_tracker().set_states(own["rng_tracker"])
        if self.probe is not None:
            self.probe.load_state_dict((own or {}).get("probe") or {"step": extra.get("probe_step") or 0})
        if self.is_logger:
            note = "" if extra["same_layout"] else " (resharded to this layout; per-rank RNG not restored)"
            print(f"resumed from {path} at step {self.iteration}{note}", flush=True)
            if extra["optimizer_reset"]:
                print("optimizer state reset: the checkpoint holds none; Adam moments start at zero", flush=True)
            elif extra["optimizer_reset_params"]:
                print(f"optimizer state reset for the head ({', '.join(extra['optimizer_reset_params'])}: new "
                      "parameters written by convert-head, Adam moments zero); every other parameter's kept",
                      flush=True)
            if changes:
                which = "this config's" if mode == "config" else "the checkpoint's"
                print(f"learning-rate schedule: {which} (checkpoint.scheduler={mode}; {'; '.join(changes)})",
                      flush=True)

    # ----------------------------------------------------------------- loop
    def train(self) -> Dict:
        cfg, t = self.cfg, self.cfg.train
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        stream = self.batches("train", self.consumed)
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        history, t0 = [], time.perf_counter()
        finished = False
        try:
            while self.iteration < t.train_steps:
                rec = self._train_step(stream)
                rec["tokens"] = self.iteration * tokens_per_step
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                rec["tokens_per_s"] = tokens_per_step / dt if dt > 0 else None
                if t.eval_interval and (self.iteration % t.eval_interval == 0 or self.iteration == t.train_steps):
                    rec["valid_loss"] = self.evaluate()
                history.append({"step": self.iteration, **rec})
                self._log(rec)
                if self.on_step is not None:
                    self.on_step(self.iteration, rec)
                c = cfg.checkpoint
                stop = self._stop_requested()
                if c.dir and (stop or (c.save_interval and self.iteration % c.save_interval == 0)
                              or self.iteration == t.train_steps):
                    self.save()
                if stop:
                    if self.is_logger:
                        print(f"received signal {self.stop.signal}: saved at step {self.iteration}, exiting",
                              flush=True)
                    break
            sync_params(self.models)  # leave the modules holding the final weights
            finished = True
        finally:
            if finished:  # a pending async save becomes the latest checkpoint before we return
                self.writer.close()
            for s, h in previous.items():
                signal.signal(s, h)
            if self.logger is not None:
                self.logger.close()
            if self.probe is not None:
                self.probe.remove()
        return {"iteration": self.iteration, "history": history, "stopped_by_signal": self.stop.signal}

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal; in the same all-reduce, whether every rank's background
        checkpoint writer is done (then the pending save is finalised: renamed, made ``latest``)."""
        busy = self.writer.busy()
        flag = torch.tensor([1.0 if self.stop.signal is not None else 0.0, 1.0 if busy else 0.0])
        if dist.is_initialized():
            if torch.cuda.is_available():
                flag = flag.cuda()
            dist.all_reduce(flag)
        stop, writing = flag.tolist()
        if self.writer.pending:
            # busy is None (the same on every rank) when the writer cannot be polled locally: Megatron's check,
            # a collective; otherwise finalise once no rank is writing any more.
            if busy is None or writing == 0:
                self.writer.finalize(blocking=busy is not None)
        return stop > 0

    def _log(self, rec: Dict) -> None:
        if not self.is_logger:
            return
        self.logger.log(self.iteration, {k: v for k, v in rec.items() if v is not None})
        li = self.cfg.train.log_interval
        if self.cfg.logging.console and (self.iteration % li == 0 or self.iteration == self.cfg.train.train_steps):
            valid = f" valid {rec['valid_loss']:.4f}" if rec.get("valid_loss") is not None else ""
            tps = rec.get("tokens_per_s") or 0.0
            total = self.cfg.train.train_steps
            done = int(20 * self.iteration / total)
            print(f"[{'#' * done}{'.' * (20 - done)}] {self.iteration:>6d}/{total} loss {rec['loss']:.4f}{valid} "
                  f"lr {rec['lr']:.2e} | {tps:,.0f} tok/s", flush=True)


def _train_entry(cfg_dict: Dict) -> Dict:
    cfg = TrainConfig.from_dict(cfg_dict)
    out = Trainer(cfg).train()
    return out if (dist.get_rank() == dist.get_world_size() - 1) else {"iteration": out["iteration"]}


def torchrun_device(device: Optional[str] = "auto", option: str = "train.device") -> DeviceChoice:
    """This torchrun rank's device (:func:`~megatron_bottleneck.base.device.resolve_device` with torchrun's
    ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``): ``auto`` without a GPU is a :class:`DeviceError` unless CPU ranks are
    asked for (``MB_CPU=1`` or ``cpu``), so a job that forgot its GPUs does not run on CPU."""
    return choose_device(device, cpu_allowed=os.environ.get("MB_CPU") == "1", option=option,
                         where=f"this torchrun / Slurm job (host {socket.gethostname()})")


def init_distributed(device: Optional[str] = "auto", option: str = "train.device") -> None:
    """Under torchrun (RANK / WORLD_SIZE set): the process group of :func:`torchrun_device`'s choice, NCCL on
    the rank's GPU ``cuda:LOCAL_RANK``, or gloo + CPU mode on CPU ranks
    (:func:`~megatron_bottleneck.integrations.launch.init_process`)."""
    if dist.is_initialized():
        return
    init_process(torchrun_device(device, option))


def run(config: TrainConfig, nproc: Optional[int] = None) -> Dict:
    """Train on this machine: under torchrun use its ranks; otherwise launch ``nproc`` local ranks (default:
    tensor x pipeline parallel size) on ``train.device``: one GPU per rank when GPUs are visible (``auto``,
    ``cuda``), else CPU ranks (see :func:`~megatron_bottleneck.base.device.resolve_device`). Returns the last
    rank's summary."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        init_distributed(config.train.device)
        return Trainer(config).train()
    p = config.parallel
    world = nproc or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    config.check_world(world)  # everything that needs no process, before spawning
    return launch(_train_entry, world, config.to_dict(), timeout=24 * 3600, device=config.train.device,
                  option="train.device")[-1]

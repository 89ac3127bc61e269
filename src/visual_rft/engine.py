"""The training engine, in one place: which of one process / DDP / FSDP / DeepSpeed ZeRO runs, how
the model is wrapped and unwrapped, which dtype the weights load in, who keeps fp32 master weights,
how micro-batches accumulate into one optimiser step, how a checkpoint is written and read back,
and the weight gather around generation. The GRPO trainer, SFT, eval and export ask `Engine`.

DeepSpeed (an `accelerate launch` config with distributed_type DEEPSPEED):
- it runs on CPU processes too (gloo), never a silent fall back to DDP (`make_accelerator`);
- the micro-batch size, accumulation and clipping come from the grpo / sft section
  (`_fill_deepspeed_config`), so the shipped configs start as they are;
- DeepSpeed owns accumulation: the boundary is set per micro-batch and the engine steps once per
  optimiser step, skipping (and reporting) a step whose gradient norm is not finite;
- DeepSpeed keeps the fp32 masters of bf16 weights itself (so no `MasterWeightAdamW`);
- under ZeRO-3 the reference model is a DeepSpeed inference engine over partitioned weights
  (1/world of its weights per rank, gathered module by module in its forward);
- checkpoints hold consolidated weights in model/ (what eval / export / predict read) and the
  sharded optimiser state (fp32 masters included) in deepspeed/, which `--resume` loads.

Under ZeRO-3 and FSDP each rank holds a slice of every sharded weight; the engine gathers the full
tensors only inside its own forward. Two things in visual-rft need care:

- generation runs hundreds of small forwards: gathering the weights once around the whole rollout
  (`full_weights_for_generation`) instead of once per decode step, as TRL does;
- the chunked LM head (`rl.lm_head.head_logprobs`) multiplies by the head weight outside the module's
  forward, where a sharded weight is empty: `is_sharded` tells it to use the model's logits instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from visual_rft.checkpoint import (CheckpointWriteError, load_training_state, room_error, save_checkpoint,
                                   start_checkpoint, write_failure)
from visual_rft.config import Config, ConfigError
from visual_rft.models.quiet import name_deepspeeds_cpu_accelerator
from visual_rft.optim import apply_optim_settings, clip_and_step, make_optimizer
from visual_rft.runlog import tracker_names

DEEPSPEED_STATE = "deepspeed"  # checkpoint-N/deepspeed/: DeepSpeed's own (sharded) optimiser state
_TAG = "state"


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every process it starts."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: Config) -> Accelerator:
    """CPU unless a GPU is there and wanted; under torchrun / accelerate launch this also sets up DDP,
    FSDP or DeepSpeed. accelerate drops a DeepSpeed config without a word when told `cpu=True`
    (distributed type MULTI_CPU, plain DDP), so a DeepSpeed launch on a machine without CUDA runs
    DeepSpeed's CPU accelerator over gloo instead, and one that asks for the CPU beside a GPU stops."""
    name_deepspeeds_cpu_accelerator()
    has_cuda = torch.cuda.is_available()
    want_cpu = cfg.model.device == "cpu" or (cfg.model.device == "auto" and not has_cuda)
    kwargs: dict[str, Any] = {}
    trackers = tracker_names(cfg.output)  # started by RunLog (init_trackers), only by the runs that log
    if trackers:  # TensorBoard events go to output.dir/tensorboard/<output.project>
        project = ProjectConfiguration(project_dir=cfg.output.dir, logging_dir=str(Path(cfg.output.dir) / "tensorboard"))
        kwargs = {"log_with": trackers, "project_config": project}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not has_cuda:
        raise ConfigError("an FSDP launch config on a machine without CUDA: accelerate's FSDP plugin needs GPUs "
                          "(it stops with 'no available devices'); on CPU processes launch configs/accelerate/ddp.yaml, "
                          "or zero2.yaml / zero3.yaml with --mixed_precision no (DeepSpeed runs on CPU)")
    if deepspeed_requested():
        if has_cuda and cfg.model.device == "cpu":
            raise ConfigError("model.device=cpu under a DeepSpeed launch config on a machine with CUDA: accelerate "
                              "would drop DeepSpeed and run plain DDP; use model.device=auto, or a ddp config")
        if not has_cuda:  # DeepSpeed's CPU accelerator; without a backend every rank would think it is alone
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(**kwargs)
    return Accelerator(cpu=want_cpu, **kwargs)


def unwrap_model(model: Any) -> Any:
    """The transformers model under DDP / DeepSpeed / torch.compile / PEFT wrappers (for its config and
    weights). A DeepSpeedEngine is recognised by name so that this needs no deepspeed import."""
    while True:
        wrapper = type(model).__name__
        if hasattr(model, "module") and (isinstance(model, torch.nn.parallel.DistributedDataParallel)
                                         or wrapper == "DeepSpeedEngine"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def is_sharded(weight: torch.Tensor) -> bool:
    """True when `weight` is a shard of a larger tensor (a ZeRO-3 partitioned parameter, an FSDP-2
    DTensor, or an FSDP-1 flat-parameter view that is empty outside forward)."""
    if hasattr(weight, "ds_id") or weight.numel() == 0:
        return True
    return type(weight).__name__ == "DTensor"


def under_fsdp(model: Any) -> bool:
    """True when `model` is, or contains, an FSDP unit. FSDP-1 with use_orig_params leaves a rank's
    slice of a weight outside forward, sometimes as a 1-D view holding every value of a small tensor,
    which no shape or size test can tell from a weight reliably; hence this structural test."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in modules)


def zero_stage(accelerator: Any) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


def fsdp_version(accelerator: Any) -> int:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1) if plugin is not None else 0


@contextlib.contextmanager
def _zero3_hooks_off(engine: Any) -> Iterator[None]:
    """ZeRO-3's module hooks off for the block, back on after. They free a module's parameters after
    its forward and all-gather them before the next, even inside GatheredParameters: a collective per
    module per forward. Generation runs as many forwards as its tokens and turns, which differ between
    processes (a rank whose rows all ended stops early; tool conversations take their own number of
    turns), so with the hooks on the ranks' collectives stop pairing up and the run hangs (measured:
    tests/test_deepspeed.py's tool run timed out at 600 s). Gathered, the weights need no hooks."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None) \
        or getattr(engine, "parameter_offload", None)
    if offload is None or not hasattr(offload, "_register_deepspeed_module") or not hasattr(offload, "fwd_pre_hook"):
        yield  # no ZeRO-3 offload object (or a DeepSpeed without this API): nothing to take off
        return
    module = offload.module
    # the start-of-forward hook checks the module trace with rank 0 (a broadcast) while it is being recorded
    start = module._forward_pre_hooks.get(offload.fwd_pre_hook.id)
    for param in module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(module)  # (invalidates the trace: the next forward records it)
        if start is not None:
            offload.fwd_pre_hook = module.register_forward_pre_hook(start, prepend=True)


@contextlib.contextmanager
def full_weights_for_generation(accelerator: Any, model: Any) -> Iterator[Any]:
    """Yield the policy to sample from, with every weight whole on this rank for the whole block.

    - ZeRO-3: all parameters gathered once (deepspeed.zero.GatheredParameters; each rank then holds
      the full model for the rollout, as in TRL) and DeepSpeed's module hooks taken off for the block
      (_zero3_hooks_off: with them on, every forward re-gathers each module, a collective per module).
    - FSDP-1: the root unit's parameters summoned (nested units gather in their own forward); called
      through the inner module, so FSDP's forward is not re-entered while summoned.
    - FSDP-2, DDP, one process: nothing to gather (FSDP-2's hooks live on the module itself).
    Weights are read-only inside: nothing is written back.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None), _zero3_hooks_off(model):
            yield accelerator.unwrap_model(model)
    elif kind == DistributedType.FSDP and fsdp_version(accelerator) == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield accelerator.unwrap_model(model)
    else:
        yield accelerator.unwrap_model(model)


def _fill_deepspeed_config(plugin: Any, section: str, *, micro_batch: int, grad_accum: int, max_grad_norm: float,
                           world: int) -> None:
    """Set what DeepSpeed needs from the run's own section before `prepare`: with no dataloader to
    read it from, accelerate stops at a missing train_micro_batch_size_per_gpu, and an accumulation
    DeepSpeed does not know of would step the optimiser after every micro-batch."""
    ds = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": (micro_batch, "per_device_batch_size" if section == "grpo"
                                                 else "batch_size"),
              "gradient_accumulation_steps": (grad_accum, "grad_accum_steps")}
    for key, (value, setting) in wanted.items():
        given = ds.get(key, "auto")
        if given not in ("auto", None, value, 1):  # 1: the launch config's default, not a choice
            raise ConfigError(f"the DeepSpeed config sets {key}={given} but {section}.{setting}={value}: visual-rft "
                              f"takes it from {section}.{setting}; leave {key} out of the launch config (or 'auto')")
        ds[key] = value
    ds["train_batch_size"] = micro_batch * grad_accum * world
    ds["gradient_clipping"] = max_grad_norm  # 0 = no clipping, as for the other engines
    plugin.gradient_accumulation_steps = grad_accum
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # checkpoint-N/model/ holds whole weights, gathered at save time
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def _deepspeed_dtype(ds: dict[str, Any]) -> torch.dtype:
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(ds.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return torch.float32


def deepspeed_load_dtype(requested: str, ds: dict[str, Any]) -> str:
    """model.dtype under the DeepSpeed config `ds` (see Engine.load_dtype)."""
    return launch_load_dtype(requested, _deepspeed_dtype(ds), deepspeed=True)


_MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # accelerate's names of its autocast dtypes


def launch_load_dtype(requested: str, launch: torch.dtype | None, *, deepspeed: bool) -> str:
    """The dtype weights load in, given model.dtype and the precision the launch config asks for
    (`launch`: DeepSpeed's own, fp32 included; else accelerate's mixed_precision, None for `no`).

    `auto` follows the launch config. An explicit model.dtype that the launch config contradicts stops,
    naming both: DeepSpeed would cast float32 weights to its bf16 (the README's ZeRO-3 line trained
    in bf16 on CPU, ~170x slower there, while the config said float32), and accelerate's autocast
    would run a float32 model's matmuls in bf16."""
    from visual_rft.models.loading import resolve_dtype

    if str(requested).lower() == "auto":
        return str(launch).removeprefix("torch.") if deepspeed else requested
    dtype = resolve_dtype(requested, "cpu")
    if launch is None or dtype == launch:
        return requested
    given = str(launch).removeprefix("torch.")
    if deepspeed and launch == torch.float32:
        raise ConfigError(f"model.dtype={requested} under DeepSpeed, whose launch config's mixed_precision gives "
                          f"{given}: DeepSpeed would step {dtype} weights without fp32 masters; set "
                          "mixed_precision in the launch config to match, or model.dtype=auto")
    who = "DeepSpeed would cast the weights to" if deepspeed else "accelerate would autocast the forward to"
    raise ConfigError(f"model.dtype={requested} but the launch config's mixed_precision is {given}: {who} {given}. "
                      f"Pass --mixed_precision no to accelerate launch to train in {requested} (on CPU: bf16 "
                      f"matmuls are far slower), or model.dtype=auto to train in {given}")


# accelerate's DistributedType members by what a user knows them as (its enum names read "NO", "MULTI_CPU")
_ENGINE_NAMES = {DistributedType.NO: "one process", DistributedType.MULTI_CPU: "DDP", DistributedType.MULTI_GPU: "DDP",
                 DistributedType.FSDP: "FSDP"}


def _quiet_deepspeeds_collective_warnings() -> None:
    """DeepSpeed 0.19 calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, which
    torch 2.13 deprecates with a FutureWarning at each call site (14 lines per run): DeepSpeed's to
    change, not the user's. Those two messages only are dropped, for the DeepSpeed runs that cause them."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)


def _attempt(save: Any, *args: Any, **kwargs: Any) -> Exception | None:
    """`save(*args, **kwargs)`, its CheckpointWriteError returned rather than raised (see Engine.save)."""
    try:
        save(*args, **kwargs)
    except CheckpointWriteError as exc:
        return exc
    return None


class Engine:
    """The engine of one training run, built from the section that trains (grpo or sft)."""

    def __init__(self, cfg: Config, section: str, *, micro_batch: int, grad_accum: int, max_grad_norm: float) -> None:
        self.accelerator = make_accelerator(cfg)
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch
        self.optim_settings = getattr(cfg, section).optim  # re-applied over a resumed checkpoint's (load_state)
        self.requested_dtype = cfg.model.dtype
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            _fill_deepspeed_config(self.accelerator.state.deepspeed_plugin, section, micro_batch=micro_batch,
                                   grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                                   world=self.accelerator.num_processes)
            self.accelerator.gradient_accumulation_steps = grad_accum
            _quiet_deepspeeds_collective_warnings()
        self.load_dtype(self.requested_dtype)  # a launch config contradicting model.dtype stops every rank here
        self.announce()

    # ------------------------------------------------------------------ what runs
    @property
    def zero_stage(self) -> int:
        return zero_stage(self.accelerator) if self.deepspeed else 0

    @property
    def may_skip_backward(self) -> bool:
        """A micro-batch with nothing to train may skip its backward only where no other rank, and no
        engine counting micro-batches (DeepSpeed), waits for it."""
        return self.accelerator.num_processes == 1 and not self.deepspeed

    def announce(self) -> None:
        """Say on stderr which engine a distributed run got (a launch config that did not take effect
        is otherwise invisible: accelerate used to turn DeepSpeed into DDP without a word)."""
        if self.accelerator.is_main_process and (self.deepspeed or self.accelerator.num_processes > 1):
            print(f"visual-rft: engine: {self.describe()}, {self.precision()}", file=sys.stderr)

    def describe(self) -> str:
        """e.g. "DeepSpeed ZeRO-3 on 2 processes, device cpu" or "one process without DeepSpeed, device cpu"."""
        kind, processes = self.accelerator.distributed_type, self.accelerator.num_processes
        name = f"DeepSpeed ZeRO-{self.zero_stage}" if self.deepspeed else _ENGINE_NAMES.get(kind, kind.value)
        where = f"on {processes} processes" if processes > 1 else "without DeepSpeed" if kind == DistributedType.NO \
            else "on 1 process"
        return f"{name} {where}, device {self.accelerator.device.type}"

    # ------------------------------------------------------------------ weights and precision
    def load_dtype(self, requested: str) -> str:
        """The dtype the policy loads in: `auto` follows the launch config's precision (DeepSpeed casts
        the weights to its own and keeps fp32 masters of them); an explicit dtype the launch config
        contradicts stops (launch_load_dtype)."""
        return launch_load_dtype(requested, self.launch_dtype(), deepspeed=self.deepspeed)

    def launch_dtype(self) -> torch.dtype | None:
        if self.deepspeed:
            return _deepspeed_dtype(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        return _MIXED_PRECISION.get(str(self.accelerator.mixed_precision))

    def precision(self) -> str:
        """The weights' dtype and who keeps fp32 masters of low-precision weights, for the engine line."""
        from visual_rft.models.loading import resolve_dtype

        dtype = resolve_dtype(self.load_dtype(self.requested_dtype), self.accelerator.device)
        name = str(dtype).removeprefix("torch.")
        if dtype == torch.float32:
            autocast = str(self.accelerator.mixed_precision)
            return f"weights {name}" + (f", autocast {autocast}" if autocast in _MIXED_PRECISION else "")
        keeper = "DeepSpeed" if self.deepspeed else "visual-rft's MasterWeightAdamW"
        return f"weights {name}, fp32 masters kept by {keeper}"

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Around loading the models. Once accelerate has registered a ZeRO-3 config, transformers
        builds every model partitioned (zero.Init), whatever the launch config's zero3_init_flag says;
        such a model also saves under other key names (transformers reverses conversions it did not
        use). The flag is honoured here: off (the shipped configs), models load whole, as on every
        other engine, and DeepSpeed partitions them when it wraps them; on, for models too large to
        load whole on one rank, they are built partitioned."""
        plugin = self.accelerator.state.deepspeed_plugin if self.deepspeed else None
        if self.zero_stage != 3 or plugin.zero3_init_flag:
            yield
            return
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def optimizer(self, model: Any, optim: Any) -> torch.optim.Optimizer:
        """AdamW; fp32 masters of bf16/fp16 weights are ours except under DeepSpeed, which keeps its own."""
        return make_optimizer(model.parameters(), optim, master_weights=not self.deepspeed)

    def prepare(self, model: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return self.accelerator.prepare(model, optimizer)

    def prepare_reference(self, model: Any) -> Any:
        """The frozen reference model for the KL term. Under ZeRO-3 it becomes a DeepSpeed inference
        engine: each rank keeps 1/world of its weights (a whole copy per rank would cost as much memory
        as the policy's unsharded weights) and its forward gathers them module by module, one more
        all-gather of the weights per reference forward. Elsewhere it stays whole on the device."""
        if self.zero_stage != 3:
            return model
        import deepspeed

        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": self.micro_batch_size, "zero_optimization": {"stage": 3},
                  **{key: ds[key] for key in ("bf16", "fp16") if key in ds}}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None, not the module
        return engine

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model)

    def generation_weights(self, model: Any) -> Any:
        """A context yielding the policy with whole weights for a rollout (full_weights_for_generation)."""
        return full_weights_for_generation(self.accelerator, model)

    # ------------------------------------------------------------------ one optimiser step
    @contextlib.contextmanager
    def micro_batch(self, model: Any, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are reduced over the processes on
        the step's last micro-batch only (DDP: no_sync before it; DeepSpeed: its accumulation boundary)."""
        if self.deepspeed:
            model.set_gradient_accumulation_boundary(last)
            yield
        elif last:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        """`loss` already carries the 1 / micro-batch count; DeepSpeed must not divide a second time.
        (accelerate's own DeepSpeed backward would also step the optimiser after every micro-batch.)"""
        if self.deepspeed:
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def step(self, model: Any, optimizer: Any, scheduler: Any) -> tuple[float, bool]:
        """Clip, step, schedule, zero: (pre-clip gradient norm, whether the step was taken). A step
        with a non-finite gradient norm is skipped whole, optimiser and schedule untouched; DeepSpeed
        detects that itself (its overflow check, on for fp32 and bf16) and reports it."""
        if not self.deepspeed:
            return clip_and_step(model, optimizer, scheduler, self.max_grad_norm, self.accelerator.clip_grad_norm_)
        model.step()
        stepped = bool(model.was_step_applied())
        norm = model.get_global_grad_norm()
        if stepped:
            scheduler.step()
        return (float(norm) if norm is not None else float("nan")), stepped

    # ------------------------------------------------------------------ checkpoints
    def save(self, model: Any, out: Path, step: int, **kwargs: Any) -> None:
        """checkpoint-`step` of the run in `out`, written by the main process (atomically, see
        checkpoint.py); under DeepSpeed every rank first writes its shard of the optimiser state (fp32
        masters included) into the staging folder, then the whole weights are gathered for model/.
        A write that fails (a full disk) stops every process together with CheckpointWriteError."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not self.deepspeed:
            failed = _attempt(save_checkpoint, out, step, model=self.unwrap(model), **kwargs) \
                if acc.is_main_process else None
        else:
            failed = self._save_deepspeed(model, out, step, kwargs)
        acc.wait_for_everyone()
        self._stop_together(failed, out, step)

    def _save_deepspeed(self, model: Any, out: Path, step: int, kwargs: dict[str, Any]) -> Exception | None:
        """DeepSpeed's save_checkpoint has collectives before and after each rank's writes, so a rank
        that fails alone would leave the others waiting there: the ranks agree on the room first, and a
        rank whose write fails anyway still meets the others in the barrier DeepSpeed's save ends with."""
        acc = self.accelerator
        staging = start_checkpoint(out, step, create=acc.is_main_process)
        acc.wait_for_everyone()
        failed: Exception | None = room_error(out, step, model)
        if self._any_process(failed is not None):
            return failed
        try:
            model.save_checkpoint(str(staging / DEEPSPEED_STATE), tag=_TAG, save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            failed = CheckpointWriteError(write_failure(out, out / f"checkpoint-{step}", f"{DEEPSPEED_STATE}/", exc,
                                                        model, None))
            torch.distributed.barrier()  # the one DeepSpeed's save ends with, where the other ranks wait
        if self._any_process(failed is not None):
            return failed
        kwargs["optimizer"] = None  # its state is in deepspeed/, sharded
        # ZeRO-3: every rank takes part in gathering the whole weights, which transformers then
        # writes under its usual names (a consolidated state dict would bypass its key mapping).
        with self.generation_weights(model) as whole:
            if acc.is_main_process:
                failed = _attempt(save_checkpoint, out, step, model=whole, staged=True, **kwargs)
        return failed

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        votes = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(votes, reduction="sum").item() > 0)

    def _stop_together(self, failed: Exception | None, out: Path, step: int) -> None:
        if not self._any_process(failed is not None):
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(start_checkpoint(out, step, create=False), ignore_errors=True)
        self.accelerator.wait_for_everyone()  # a launcher stops the others once one process exits
        raise failed or CheckpointWriteError(f"cannot write checkpoint-{step} in {out}: another process failed "
                                             "(its error is above)")

    def load_state(self, model: Any, ckpt: Path, *, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """Restore what `save` wrote beside the weights; returns trainer_state.json."""
        written_by_deepspeed = (ckpt / DEEPSPEED_STATE).is_dir()
        if written_by_deepspeed != self.deepspeed:
            raise ConfigError(f"{ckpt} was written {'with' if written_by_deepspeed else 'without'} DeepSpeed and this "
                              f"run is {self.describe()}: resume with the launch config that wrote it (its weights "
                              "in model/ load anywhere as a new run's model.name_or_path)")
        if self.deepspeed:
            model.load_checkpoint(str(ckpt / DEEPSPEED_STATE), tag=_TAG, load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
            optimizer = None
        state = load_training_state(ckpt, optimizer=optimizer, scheduler=scheduler)
        apply_optim_settings(scheduler, self.optim_settings)  # a resume with changes runs the new ones
        return state

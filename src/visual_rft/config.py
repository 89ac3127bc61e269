"""Typed run configuration: dataclass defaults < YAML file < `key=value` overrides, validated on load.

Every hyper-parameter of a run lives here with an explicit default, so nothing is silently
inherited from a library default that may change (the original release's KL weight became 0 when
TRL changed its default). The resolved config is written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class LoraSettings:
    """Low-rank adapters on the language model (never the vision tower)."""

    enabled: bool = False  # train LoRA adapters instead of all weights
    r: int = 16  # adapter rank (inner dimension of each low-rank update)
    alpha: int = 32  # LoRA scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.05  # dropout probability on the adapter input
    # module names (last dotted part) that get adapters, matched in the language model only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """Which model to train and how to place it."""

    name_or_path: str = "runs/tiny-model"  # local directory or hub id of the policy
    dtype: str = "auto"  # auto = fp32 on CPU, bf16 on GPU; or float32 / bfloat16 / float16
    device: str = "auto"  # auto = cuda when available, else cpu
    # auto = flash_attention_2 on a GPU in bf16/fp16 where flash-attn is installed, else sdpa (packed
    # group scoring needs a 4-D mask: under flash-attention its forward runs sdpa, the rest flash)
    attn_implementation: Optional[str] = "auto"
    freeze_vision: bool = False  # keep the vision tower fixed
    gradient_checkpointing: bool = False  # trade compute for activation memory
    lora: LoraSettings = field(default_factory=LoraSettings)  # adapters instead of full fine-tuning
    min_pixels: Optional[int] = None  # processor lower bound on image area, in pixels (None = checkpoint's)
    max_pixels: Optional[int] = None  # processor upper bound on image area, in pixels (paper: 401408)


@dataclass
class DataConfig:
    """Where records come from (JSON/JSONL, save_to_disk, parquet, ImageFolder, embedded:mnist)."""

    train: str = ""  # training split path (`dir::split` picks a DatasetDict split)
    eval: Optional[str] = None  # held-out split for `eval`, and for evaluation during train/sft (eval.steps)
    image_root: Optional[str] = None  # base folder for relative image paths
    image_size: Optional[int] = None  # resize images to this square side, in pixels (None = keep)
    limit: Optional[int] = None  # use only the first N records of each split
    check: bool = True  # decode every image and parse every solution before a run starts
    on_bad_record: Literal["fail", "skip"] = "fail"  # a bad record stops the run, or is skipped and counted
    max_image_pixels: int = 64_000_000  # larger images (width x height) are bad records (never decoded)


NO_THINK_INSTRUCTION = "Output the final answer in <answer> </answer> tags."


@dataclass
class TaskConfig:
    """The task: its prompt and its verifiable rewards."""

    name: Literal["classification", "detection", "grounding"] = "classification"  # verifier and answer format
    mode: Literal["strict", "visual_rft"] = "strict"  # reward semantics; visual_rft = original release
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])  # names or module:function
    reward_weights: Optional[list[float]] = None  # one per reward; None = all 1.0
    # the question put to the model when the record has no problem text of its own ({field} placeholders
    # are filled from the record, e.g. {category})
    question: str = "This is an image containing a plant. Please identify the species of the plant based on the image."
    instruction: str = (
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
        "The output answer format should be as follows:\n<think> ... </think> <answer>species name</answer>\n"
        "Please strictly follow the format."
    )  # appended to the question on a new line when the record has no problem text of its own
    system_prompt: Optional[str] = None  # optional system message
    # on = <think>…</think><answer>…</answer> (the paper's); off = No-Thinking RFT (CLS-RL, Li et al.
    # 2025): the answer block alone, which the format reward then requires, and SFT targets drop the think
    thinking: Literal["on", "off"] = "on"
    # Box coordinates in answers and solutions: qwen2vl = 0-1000 relative, pixels = the model input's
    # pixels, normalized = 0-1; auto = the model family's own (models/families.py). A data source's
    # `?box_space=` option or a record's box_space field wins over it.
    box_space: Literal["auto", "qwen2vl", "pixels", "normalized"] = "auto"


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule: how one optimiser step changes the weights. GRPO and SFT
    each have one (`grpo.optim`, `sft.optim`), with their own defaults."""

    learning_rate: float  # peak AdamW learning rate (no shared default: each section names its own)
    adam_beta1: float = 0.9  # AdamW first-moment (gradient) decay per step
    adam_beta2: float = 0.999  # AdamW second-moment (squared gradient) decay per step
    weight_decay: float = 0.0  # AdamW decoupled weight decay, per step, scaled by the learning rate
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # learning-rate shape after warm-up
    warmup_ratio: float = 0.0  # fraction of the run's optimiser steps spent warming up linearly from 0
    max_grad_norm: float = 1.0  # clip the global gradient L2 norm to this before each step; <= 0 disables
    # a step whose loss or gradient is NaN/inf is skipped; stop the run after this many in a row
    max_nonfinite_steps: int = 3


@dataclass
class VLLMConfig:
    """vLLM rollouts (grpo.rollout=vllm): the engine colocated in each training process, its memory,
    and the correction of the mismatch between its log-probs and the trainer's."""

    gpu_memory_utilization: float = 0.3  # CUDA: fraction of the GPU vLLM may take (weights + KV cache); the rest trains
    kv_cache_gib: float = 1.0  # CPU: KV-cache space in GiB (vLLM's kv_cache_memory_bytes; its default reserves far more)
    tensor_parallel_size: int = 1  # GPUs per engine (colocated: one engine per training process at 1)
    enforce_eager: Optional[bool] = None  # None = eager on CPU, CUDA graphs on GPU
    sleep: bool = True  # CUDA: free vLLM's weights and KV cache during the update (sleep mode), wake before the next rollout
    max_model_len: Optional[int] = None  # None = grpo.max_prompt_length + grpo.max_completion_length
    # truncated importance sampling: each token's (or completion's) loss is weighted by
    # pi_trainer / pi_vllm of the sampled tokens, capped (truncate) or zeroed above the cap (mask)
    correction: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "off"] = "token_truncate"
    correction_cap: float = 3.0  # C of the truncation / mask


@dataclass
class GRPOConfig:
    """GRPO: sampling, advantages, the clipped objective, the KL term and the optimiser."""

    num_generations: int = 8  # G, completions sampled per prompt
    per_device_batch_size: int = 1  # prompts per micro-batch on each device
    grad_accum_steps: int = 2  # micro-batches per optimiser step (prompts per step = this x batch x devices)
    num_epochs: float = 1.0  # passes over the training split
    max_steps: int = -1  # stop after this many optimiser steps (-1 = from num_epochs)
    # the paper's 2B runs use 1e-6 (TRL's GRPO default then, written out)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-6))
    beta: float = 0.04  # KL weight to the reference model; 0 skips the reference entirely
    epsilon: float = 0.2  # lower clip range of the ratio: clipped below 1 - epsilon
    epsilon_high: Optional[float] = None  # upper clip range (DAPO clip-higher): above 1 + this; None = epsilon
    num_iterations: int = 1  # policy updates per rollout batch (mu)
    # how token losses are averaged: grpo = per completion, then over completions; dr_grpo = sum /
    # (completions x max_completion_length); dapo = over all tokens of the optimiser step
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO's sequence-level ratio
    scale_rewards: bool = True  # divide advantages by the group std (False = Dr. GRPO)
    # completions no reward could score (every reward returned None): reward 0 like any failure, or
    # left out of their group's mean/std with advantage 0 (TRL's behaviour)
    unscorable: Literal["zero", "exclude"] = "zero"
    skip_zero_variance_groups: bool = False  # leave groups whose rewards are all equal out of the loss
    mask_truncated_completions: bool = False  # leave completions cut at max_completion_length out of the loss
    # auto = the shortcuts (prefill once per group, packed scoring, chunked LM head with gradients in
    # the forward) wherever the model allows them; off = plain transformers generate + full-logits
    # scoring, to check a number against. Which path ran is logged every step (fast/*).
    fast: Literal["auto", "off"] = "auto"
    # token draw while sampling: auto = inverse CDF on CPU (cheap over a large vocabulary, same
    # distribution), multinomial on GPU; multinomial = transformers' own draw (needs nothing else)
    sampler: Literal["auto", "multinomial", "inverse_cdf"] = "auto"
    temperature: float = 1.0  # sampling temperature; log-probs are scored from logits / temperature too
    top_p: float = 1.0  # nucleus sampling probability mass (1 = off); not reflected in the scored log-probs, as in TRL
    top_k: int = 0  # sample among the k most likely tokens only (0 = off)
    max_prompt_length: int = 1024  # tokens, image tokens included; longer prompts are an error (images must not be cut)
    max_completion_length: int = 256  # new tokens per completion
    seed: int = 42  # data order, sampling (per step and micro-batch slot) and initialisation
    # what draws the completions: hf = this project's transformers decode loop on the policy itself;
    # vllm = vLLM colocated in each training process, weights synced before every rollout (pip install
    # vllm); auto = vllm where it is installed and serves the model, else hf (the reason said once)
    rollout: Literal["hf", "vllm", "auto"] = "hf"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # used by rollout=vllm (and auto when it picks vllm)


@dataclass
class SFTConfig:
    """The supervised baseline on the same records: learn `<think>…</think>` + the solution."""

    think: str = "I look at the image and identify it."  # reasoning text placed in the target
    batch_size: int = 8  # records per micro-batch on each device
    grad_accum_steps: int = 1  # micro-batches per optimiser step (records per step = this x batch x devices)
    num_epochs: float = 1.0  # passes over the training split
    max_steps: int = -1  # stop after this many optimiser steps (-1 = from num_epochs)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-5))
    seed: int = 42  # data order and initialisation


@dataclass
class EvalConfig:
    """Greedy (or sampled) decoding over a split, scored by the task's own verifier."""

    batch_size: int = 16  # records per generate call
    max_new_tokens: int = 256  # new tokens per completion
    temperature: float = 0.0  # 0 = greedy
    steps: int = 0  # train/sft: evaluate on data.eval every N optimiser steps and at the end (0 = only at the end, -1 = never)


@dataclass
class ToolsConfig:
    """Thinking with images: multi-turn rollouts in which the model calls image tools (tools/, issue 29).

    Used by `train`, `sft` (trajectories from each record's `tool_calls` field), `eval` and `predict`."""

    enabled: bool = False  # off: every rollout is one turn, as in Visual-RFT
    names: list[str] = field(default_factory=lambda: ["crop", "zoom", "rotate", "flip", "contrast"])  # offered tools
    max_turns: int = 3  # model turns per conversation; a tool call in the last one is cut off (truncated)
    zoom_pixels: Optional[int] = None  # a zoom's output area in pixels (None = the area of the image zoomed into)
    call_reward: float = 0.0  # weight of the per-call reward tool_calls_ok (share of calls that ran); 0 = off
    think: str = "I look closer with a tool."  # sft: the reasoning written before each trajectory call


@dataclass
class OutputConfig:
    """Where a run writes and how often."""

    dir: str = "runs/grpo"  # run directory: config.yaml, metrics.jsonl, checkpoint-N/ ...
    save_steps: int = 100  # checkpoint every N optimiser steps (0 = only at the end)
    save_total_limit: int = 2  # keep this many newest checkpoints
    log_steps: int = 1  # metrics line every N steps
    sample_steps: int = 10  # save sampled rollouts every N steps (0 = never)
    tensorboard: bool = False  # also write TensorBoard events (same as adding tensorboard to report_to)
    # experiment trackers, through accelerate's integration: tensorboard, wandb, mlflow (or another
    # tracker accelerate knows); metrics.jsonl is always written. wandb offline: WANDB_MODE=offline
    report_to: list[str] = field(default_factory=list)
    project: str = "visual-rft"  # tracker project (wandb) / experiment (mlflow); the run is named after dir
    progress: bool = True  # console progress bar


@dataclass
class DemoConfig:
    """The CPU demo's extra phases (used only by `visual-rft demo` and the sweep's warm-up)."""

    dataset: Literal["mnist", "trees"] = "mnist"  # embedded digits (classification) or tree tiles of data.train/eval (detection)
    seed: int = 0  # data split, tiny-model weights and k-shot sample
    warmup_records: int = 3000  # records for the supervised warm-up that teaches the answer format
    pool_records: int = 1000  # records the k-shot sample is drawn from (disjoint from the warm-up)
    test_records: int = 1000  # held-out records for base / SFT / RFT evaluation (trees: at most this many of data.eval)
    k: int = 16  # examples per class (trees: tiles of the one class "tree") for SFT and RFT
    corpus_records: int = 0  # warm-up prompts + answers added to the tiny tokenizer's corpus (long answers -> fewer tokens)
    warmup_steps: int = 300  # warm-up SFT steps (on the demo's digits: 250 -> ~53%, 300 -> ~62%, 450 -> ~85% held-out)
    warmup_batch_size: int = 32  # warm-up SFT records per step
    warmup_learning_rate: float = 1e-3  # warm-up SFT learning rate (its other optimiser settings are sft.optim's)


@dataclass
class SweepConfig:
    """`visual-rft sweep`: SFT vs RFT from one base, over k-shot sizes x seeds (see sweep.py).

    Each run trains `images_seen / images_per_step` steps at a learning rate searched per method at
    `search_k`; the sweep sets the runs' max_steps, batch size, grad_accum_steps (1), learning rate
    and seed itself, so those settings of the grpo / sft sections are not used.
    """

    base: Literal["warmup", "model"] = "warmup"  # the demo's warm-up on its digits (cached), or model.name_or_path as is
    target: str = "demo"  # k-shot pool / validation / held-out: "demo" = the demo's digit split, else any data source
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # examples per class
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # each: its own k-shot draw and training seed
    images_seen: int = 800  # training images per run, both methods (steps = images_seen / images_per_step)
    images_per_step: int = 8  # SFT batch size = GRPO prompts per step (each with G completions)
    learning_rates: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])  # searched per method
    search_k: int = 4  # the learning-rate search runs at this k, on the first seed, scored on validation
    val_records: int = 200  # validation records carved from the pool (never from the held-out split)
    test_records: Optional[int] = None  # held-out records (target != demo: required; demo: None = all of it)
    metric: str = "accuracy"  # the held-out metric compared (a key of eval's metrics.json)
    base_cache: str = "runs/sweep-bases"  # warm-up bases, one folder per warm-up setting, reused across sweeps
    # what trains from each base: sft, rft (thinking on) and rft_nothink (GRPO with task.thinking=off)
    methods: list[str] = field(default_factory=lambda: ["sft", "rft"])
    # warm-up lengths, one base each (None: the one base of demo.warmup_steps); each base's held-out
    # metric is in the table, so RFT - SFT is measured against the base's prior
    base_steps: Optional[list[int]] = None


@dataclass
class Config:
    """A whole run: one section per concern, each spelled in YAML as its own mapping."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the policy and how it is placed
    data: DataConfig = field(default_factory=DataConfig)  # where records come from
    task: TaskConfig = field(default_factory=TaskConfig)  # prompt and rewards
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # `visual-rft train`
    sft: SFTConfig = field(default_factory=SFTConfig)  # `visual-rft sft`
    eval: EvalConfig = field(default_factory=EvalConfig)  # `visual-rft eval` and evaluation during training
    tools: ToolsConfig = field(default_factory=ToolsConfig)  # multi-turn image tools (train, sft, eval, predict)
    output: OutputConfig = field(default_factory=OutputConfig)  # where runs write
    demo: DemoConfig = field(default_factory=DemoConfig)  # `visual-rft demo`
    sweep: SweepConfig = field(default_factory=SweepConfig)  # `visual-rft sweep`


# ----------------------------------------------------------------------------- building from dicts


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(choices)})"


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off / on / no / yes as a boolean
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in typing.get_args(tp)), value)
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-6" (no dot) as a string; accept it as the number it is
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: dict[str, Any], where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a nested dict on top of `base` (default: `cls()`), rejecting unknown
    keys and wrong types. A nested section takes its defaults from the field's own default, so
    `sft.optim.learning_rate=...` keeps SFT's other optimiser defaults, not OptimConfig's."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(_unknown_key(key, path, names))
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = build(type(current), value, path, base=current)
        else:
            changes[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(base, **changes)


def _unknown_key(key: str, path: str, names: list[str]) -> str:
    """The error for a key its section (`names`) lacks; an optimiser key given outside its section's
    `optim` block (where it lived before) names its place."""
    if "optim" in names and key in {f.name for f in dataclasses.fields(OptimConfig)}:
        section = path.rsplit(".", 1)[0]
        return f"unknown config key '{path}': the optimiser settings moved, it is now '{section}.optim.{key}'"
    return f"unknown config key '{path}'" + _suggest(key, names)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `a.b=value` strings into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML at `path` < `key=value` overrides; validated, with errors naming the key."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    try:
        cfg = build(Config, tree)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    try:  # on top of the file's values, so an error here is blamed on the command line, not on the file
        cfg = build(Config, parse_overrides(overrides or []), base=cfg)
    except ConfigError as exc:
        raise ConfigError(f"command-line override: {exc}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    g = cfg.grpo
    positive = {
        "grpo.num_generations": g.num_generations, "grpo.per_device_batch_size": g.per_device_batch_size,
        "grpo.grad_accum_steps": g.grad_accum_steps, "grpo.num_iterations": g.num_iterations,
        "grpo.max_completion_length": g.max_completion_length, "grpo.max_prompt_length": g.max_prompt_length,
        "sft.batch_size": cfg.sft.batch_size, "sft.grad_accum_steps": cfg.sft.grad_accum_steps,
        "eval.batch_size": cfg.eval.batch_size, "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "grpo.optim.max_nonfinite_steps": g.optim.max_nonfinite_steps,
        "sft.optim.max_nonfinite_steps": cfg.sft.optim.max_nonfinite_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.eval.steps < -1:
        raise ConfigError(f"eval.steps must be >= 0 (0 = only at the end) or -1 (never), got {cfg.eval.steps}")
    if g.num_generations < 2:
        raise ConfigError("grpo.num_generations must be >= 2: group advantages need at least two samples")
    if g.beta < 0 or g.epsilon <= 0 or (g.epsilon_high is not None and g.epsilon_high <= 0):
        raise ConfigError("grpo.beta must be >= 0 and grpo.epsilon / epsilon_high > 0")
    if g.temperature <= 0:
        raise ConfigError(f"grpo.temperature must be > 0 for sampling, got {g.temperature}")
    if g.sampler == "inverse_cdf" and g.fast == "off":
        raise ConfigError("grpo.sampler=inverse_cdf needs grpo.fast=auto (with fast=off, transformers' "
                          "generate samples, which draws by multinomial)")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"grpo.top_p must be in (0, 1], got {g.top_p}")
    if not 0 < g.vllm.gpu_memory_utilization <= 1 or g.vllm.kv_cache_gib <= 0 or g.vllm.tensor_parallel_size < 1:
        raise ConfigError("grpo.vllm.gpu_memory_utilization must be in (0, 1], grpo.vllm.kv_cache_gib > 0 and "
                          "grpo.vllm.tensor_parallel_size >= 1")
    if g.vllm.correction_cap < 1:
        raise ConfigError(f"grpo.vllm.correction_cap must be >= 1 (a weight cap below 1 down-weights every "
                          f"token), got {g.vllm.correction_cap}")
    _validate_tools(cfg)
    weights = cfg.task.reward_weights
    if weights is not None and len(weights) != len(cfg.task.rewards):
        raise ConfigError(
            f"task.reward_weights has {len(weights)} entries but task.rewards has {len(cfg.task.rewards)}"
        )
    if not cfg.task.rewards:
        raise ConfigError("task.rewards is empty: GRPO needs at least one reward")
    if cfg.task.thinking == "off" and "<think>" in cfg.task.instruction:
        raise ConfigError(f"task.thinking=off but task.instruction asks for a <think> block; set "
                          f"task.instruction='{NO_THINK_INSTRUCTION}' (or your own answer-only instruction)")
    if cfg.output.report_to:
        from visual_rft.runlog import check_trackers  # imports accelerate: only when trackers are asked for
        check_trackers(cfg.output.report_to)


def _validate_tools(cfg: Config) -> None:
    t = cfg.tools
    if not t.enabled:
        return
    from visual_rft.tools.registry import select_tools  # the registry imports no config: no cycle

    try:
        select_tools(t.names)  # unknown names, or none
    except ValueError as exc:
        raise ConfigError(f"tools.names: {exc}") from None
    if t.max_turns < 2:
        raise ConfigError(f"tools.max_turns must be >= 2 (a call, then the answer after seeing its result), "
                          f"got {t.max_turns}")
    if t.zoom_pixels is not None and t.zoom_pixels < 64:
        raise ConfigError(f"tools.zoom_pixels must be >= 64 pixels (or null), got {t.zoom_pixels}")
    if t.call_reward < 0:
        raise ConfigError(f"tools.call_reward must be >= 0, got {t.call_reward}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

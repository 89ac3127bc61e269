"""vLLM rollouts, colocated: one engine inside each training process, its weights synced from the
policy before every rollout, its own log-probs returned for the mismatch correction (rl/mismatch.py).

In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as TRL's and EasyR1's colocated modes run it. Weights
go in with the worker's `reload_weights`, the call vLLM's CPU backend also serves (its linear layers
are prepacked, so the GPU recipe's model.load_weights has nothing to copy into there); the engine's
encoder and prefix caches are cleared after each sync, or images seen before would reuse features of
the old weights. Log-probs are vLLM's processed ones: those of the distribution it drew from
(temperature, suppressed vision tokens, top-k / top-p), the ones importance sampling needs.

Prompts: a one-turn rollout hands vLLM the chat text and images (vLLM tokenizes and expands them); a
tool conversation's turn (no question texts: request.row_images) hands it the row's token ids, the
model's earlier turns as it generated them. vLLM 0.32 always applies its image prompt updates to token
prompts (Qwen2-VL: each `<|image_pad|>` target becomes the image's run of them), so ids whose images
are already expanded would be expanded twice (measured on the tiny Qwen2-VL: 134 ids with 8 pads in,
140 ids with 14 pads out). Each image's expansion is therefore folded back to the placeholder the
template writes (the processor's image token) before vLLM gets the ids, and vLLM expands it again; its
prompt ids are checked to equal the trainer's, as for text prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from typing import Any

import torch

from visual_rft.config import Config
from visual_rft.models.loading import chat_text
from visual_rft.rl.engines.base import Generation, RolloutRequest
from visual_rft.rl.engines.vllm_model_dir import serving_dir
from visual_rft.rl.engines.weights import policy_weights
from visual_rft.rl.rollout import completion_mask, decode_completions, eos_token_ids


def _row_seed(seed: int, row: int) -> int:
    """Each prompt's own seed, so its G samples do not depend on what else shares the batch. Hashed:
    vLLM seeds a request's n samples with consecutive values, so consecutive row seeds would hand
    one prompt's second sample the next prompt's first random stream."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _repack_tied_heads(model: torch.nn.Module) -> int:
    """vLLM's CPU backend keeps a prepacked copy of the LM head for its GEMM kernels. A head tied to
    the input embedding gets no weight of its own in a reload (loaders skip lm_head when tied), so its
    packed copy would keep the old weights while the embedding moved: repack it from the shared,
    already reloaded weight (measured: 0.2 nats off after one sync on the tiny tied Qwen2-VL, without)."""
    embeddings = {id(m.weight) for m in model.modules() if type(m).__name__ == "VocabParallelEmbedding"}
    repacked = 0
    for module in model.modules():
        if type(module).__name__ == "ParallelLMHead" and id(module.weight) in embeddings:
            module.quant_method.process_weights_after_loading(module)
            repacked += 1
    return repacked


class VLLMRolloutEngine:
    name = "vllm"
    syncs_weights = True

    def __init__(self, cfg: Config, training_engine: Any, policy: Any, processor: Any, suppress_ids: list[int],
                 max_images: int = 1) -> None:
        self.cfg, self.g, self.v = cfg, cfg.grpo, cfg.grpo.vllm
        self.training_engine, self.processor, self.tokenizer = training_engine, processor, processor.tokenizer
        self.device = training_engine.accelerator.device
        self.eos = eos_token_ids(policy, self.tokenizer)
        self.bad_words = self._suppressed_words(suppress_ids)
        self.cuda = self.device.type == "cuda"
        self.tool_turns = cfg.tools.max_turns if cfg.tools.enabled else 1
        # a tool conversation gains an image per tool result: up to max_turns - 1 more than its prompt's
        self.llm = self._start(policy, max_images + self.tool_turns - 1)
        self.asleep = False

    # ------------------------------------------------------------------ start-up
    def _suppressed_words(self, suppress_ids: list[int]) -> list[str]:
        """Vision tokens as vLLM bad words (single tokens: masked to -inf at every step, as hf suppresses)."""
        words = []
        for token_id in sorted(set(suppress_ids)):
            word = self.tokenizer.convert_ids_to_tokens(token_id)
            if self.tokenizer.encode(word, add_special_tokens=False) != [token_id]:
                raise ValueError(f"vision token {token_id} ({word!r}) does not encode to itself; vLLM could not "
                                 "suppress it (use grpo.rollout=hf)")
            words.append(word)
        return words

    def _start(self, policy: Any, max_images: int) -> Any:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in this process (colocated)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        threads, dtype = torch.get_num_threads(), next(policy.parameters()).dtype
        started = time.perf_counter()
        llm = LLM(
            model=serving_dir(policy.config._name_or_path), dtype=str(dtype).removeprefix("torch."),
            seed=self.g.seed, max_model_len=self._max_model_len(policy),
            enforce_eager=self.v.enforce_eager if self.v.enforce_eager is not None else not self.cuda,
            limit_mm_per_prompt={"image": max_images, "video": 0}, logprobs_mode="processed_logprobs",
            gpu_memory_utilization=self.v.gpu_memory_utilization, tensor_parallel_size=self.v.tensor_parallel_size,
            enable_sleep_mode=self.cuda and self.v.sleep, disable_log_stats=True,
            # CPU: the KV cache's size in bytes (a fractional GiB too; VLLM_CPU_KVCACHE_SPACE takes whole GiB only)
            **({} if self.cuda else {"kv_cache_memory_bytes": int(self.v.kv_cache_gib * 2**30)}),
        )
        torch.set_num_threads(threads)  # vLLM lowers the process's torch threads for serving; training needs them
        if self.training_engine.accelerator.is_main_process:
            print(f"visual-rft: vLLM rollout engine ready in {time.perf_counter() - started:.1f} s "
                  f"({str(dtype).removeprefix('torch.')}, {'GPU' if self.cuda else 'CPU'})", file=sys.stderr)
        return llm

    def _max_model_len(self, policy: Any) -> int:
        """grpo.vllm.max_model_len, else the longest prompt + completion, within the model's positions."""
        if self.v.max_model_len:
            return self.v.max_model_len
        wanted = self.g.max_prompt_length + self.g.max_completion_length
        # tool conversations: every turn adds a completion and a tool result (an image, at most about
        # as large as a prompt's); a turn whose prompt leaves no room for a completion is refused below
        wanted *= self.tool_turns
        limit = getattr(policy.config.get_text_config(), "max_position_embeddings", None)
        return min(wanted, limit) if limit else wanted

    # ------------------------------------------------------------------ weights
    def sync(self, model: Any) -> bool:
        """The policy's current weights into vLLM (gathered under ZeRO-3 / FSDP, LoRA merged)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        with self.training_engine.generation_weights(model) as policy:
            weights = list(policy_weights(policy))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        del weights
        if not self.cuda:
            self.llm.apply_model(_repack_tied_heads)
        # Features and prefixes computed under the old weights must not be reused.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return True

    def hold(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """Nothing to hold: the engine has its own weights (synced before the rollout)."""
        return contextlib.nullcontext()

    def after_rollout(self) -> None:
        """CUDA: free vLLM's weights and KV cache while the trainer updates (the next sync wakes it).
        Once per step, after every micro-batch's rollout: a sleeping engine cannot draw the next one."""
        if self.cuda and self.v.sleep and not self.asleep:
            self.llm.sleep(level=2)  # weights are resent by the next sync anyway
            self.asleep = True

    # ------------------------------------------------------------------ sampling
    def _prompts(self, request: RolloutRequest) -> list[dict[str, Any]]:
        """The chat text and images the trainer's processor got (request.images / prompts), for vLLM to process."""
        prompts = []
        for images, question in zip(request.images, request.prompts):
            text = chat_text(self.processor, question, system=self.cfg.task.system_prompt, images=len(images))
            prompts.append({"prompt": text, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}})
        return prompts

    def _token_prompts(self, request: RolloutRequest) -> list[dict[str, Any]]:
        """Each row's unpadded ids (its images folded back to their placeholders) and its images."""
        if request.row_images is None:
            raise ValueError("a rollout request without question texts needs each row's images (row_images)")
        limit = self.llm.llm_engine.vllm_config.model_config.max_model_len
        prompts = []
        for row, images in enumerate(request.row_images):
            ids = request.group_inputs["input_ids"][row][request.group_inputs["attention_mask"][row].bool()].tolist()
            if len(ids) + self.g.max_completion_length > limit:
                raise ValueError(f"a tool conversation of {len(ids)} tokens leaves no room for a "
                                 f"{self.g.max_completion_length}-token turn within vLLM's max_model_len={limit}; "
                                 "raise grpo.vllm.max_model_len")
            prompts.append({"prompt_token_ids": self._fold_images(ids, images, row),
                            "multi_modal_data": {"image": images if len(images) > 1 else images[0]}})
        return prompts

    def _fold_images(self, ids: list[int], images: list[Any], row: int) -> list[int]:
        """`ids` with each image's expansion (the processor's output for its image token and that image
        alone, found in order) replaced by the image token: the prompt vLLM expands itself."""
        token = getattr(self.processor, "image_token", None)
        if token is None:
            raise ValueError(f"{type(self.processor).__name__} names no image token; vLLM cannot take its token "
                             "prompts (use grpo.rollout=hf for tool rollouts)")
        placeholder = self.tokenizer.encode(token, add_special_tokens=False)
        folded, start = [], 0
        for k, image in enumerate(images):
            expanded = self.processor(text=[token], images=[[image]], add_special_tokens=False,
                                      return_tensors="pt")["input_ids"][0].tolist()
            at = next((i for i in range(start, len(ids) - len(expanded) + 1) if ids[i:i + len(expanded)] == expanded),
                      None)
            if at is None:
                raise RuntimeError(f"row {row}: image {k}'s tokens (the processor's expansion of {token!r}) are not "
                                   "in the prompt ids; vLLM cannot take this family's token prompts "
                                   "(use grpo.rollout=hf for tool rollouts)")
            folded += ids[start:at] + placeholder
            start = at + len(expanded)
        return folded + ids[start:]

    def _params(self, base_seed: int, rows: int, group_size: int) -> list[Any]:
        from vllm import SamplingParams

        # vLLM draws one greedy completion per prompt: the G identical ones are copies (generate below)
        n = group_size if self.g.temperature > 0 else 1
        return [SamplingParams(n=n, temperature=self.g.temperature, top_p=self.g.top_p, top_k=self.g.top_k,
                               max_tokens=self.g.max_completion_length, logprobs=0, seed=_row_seed(base_seed, row),
                               stop_token_ids=self.eos, bad_words=self.bad_words or None, detokenize=False)
                for row in range(rows)]

    def generate(self, model: Any, request: RolloutRequest) -> Generation:
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
        params = self._params(seed, len(request.records), request.group_size)
        # question texts: the one-turn prompt as text; none (a tool conversation's turn): token prompts
        prompts = self._prompts(request) if request.prompts is not None else self._token_prompts(request)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self._check_prompts(outputs, request.group_inputs)
        copies = request.group_size if self.g.temperature == 0 else 1
        samples = [sample for out in outputs for sample in sorted(out.outputs, key=lambda s: s.index)
                   for _ in range(copies)]
        ids, logp = self._padded(samples)
        mask = completion_mask(ids, self.eos)
        texts = decode_completions(self.tokenizer, ids, mask)
        return Generation(ids.to(self.device), mask.to(self.device), texts, sampler_logp=(logp * mask).to(self.device),
                          paths={"vllm": True})

    def _padded(self, samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [N, T] padded after each completion, and each sampled token's log-prob [N, T]."""
        length = max(1, max(len(s.token_ids) for s in samples))
        ids = torch.full((len(samples), length), self.tokenizer.pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(samples), length)
        for row, sample in enumerate(samples):
            n = len(sample.token_ids)
            ids[row, :n] = torch.tensor(sample.token_ids)
            # logprobs=0: each step's dict holds the sampled token (and nothing else)
            logp[row, :n] = torch.tensor([step[token].logprob
                                          for token, step in zip(sample.token_ids, sample.logprobs)])
        return ids, logp

    def _check_prompts(self, outputs: list[Any], group_inputs: dict[str, torch.Tensor]) -> None:
        """vLLM's prompt tokens must be the trainer's: the same image expansion (a double expansion or a
        different number of image tokens would score completions against another prompt)."""
        for row, out in enumerate(outputs):
            mask = group_inputs["attention_mask"][row].bool()
            ours = group_inputs["input_ids"][row][mask].tolist()
            if list(out.prompt_token_ids) != ours:
                raise RuntimeError(f"vLLM's prompt for row {row} has {len(out.prompt_token_ids)} tokens where the "
                                   f"trainer's processor made {len(ours)} (image expansion differs); "
                                   "use grpo.rollout=hf for this model")

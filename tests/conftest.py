"""Shared fixtures: one tiny model and one small real-digit dataset per test session."""

from pathlib import Path

import pytest
import torch

from visual_rft.config import load_config
from visual_rft.data.embedded import mnist_records
from visual_rft.data.fewshot import sample_k_shot, write_split
from visual_rft.data.record import Record
from visual_rft.models.tiny import build_tiny_model

DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def digits_jsonl(tmp_path_factory) -> Path:
    """20 real digits (2 per class) written as a reusable split."""
    records = sample_k_shot(mnist_records(limit=200, size=56), 2, seed=0)
    return write_split(records, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory):
    """12 records: comparison questions over pairs of real digits (two images each), mixed with
    single-digit questions (one image)."""
    digits = mnist_records(limit=12, size=56)
    records = []
    for i in range(0, 12, 2):
        a, b = digits[i], digits[i + 1]
        larger = max(a.fields["label"], b.fields["label"])
        records.append(Record([a.load_image(), b.load_image()], "Which of the two digits is larger?",
                              f"<answer>{larger}</answer>", {"label": larger}, f"pair{i}"))
        records.append(Record(a.load_image(), "Which digit is this?", a.solution, {"label": a.fields["label"]}, f"one{i}"))
    return write_split(records, tmp_path_factory.mktemp("pairs"))


@pytest.fixture
def small_cfg(tiny_model_dir, digits_jsonl, tmp_path):
    """The demo config shrunk to seconds: 2 prompts x G=4, 8 new tokens."""
    def make(*overrides: str):
        return load_config(DEMO_CONFIG, [
            f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}", f"data.eval={digits_jsonl}",
            f"output.dir={tmp_path / 'run'}", "output.progress=false", "grpo.num_generations=4",
            "grpo.per_device_batch_size=2", "grpo.max_completion_length=8", "grpo.max_steps=2",
            "eval.max_new_tokens=8", "eval.batch_size=10", *overrides,
        ])
    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on shared cores OpenMP's spin-waiting makes two threads ~15x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOOL_WARMUP = ["data.train=embedded:mnist_rotated", "data.limit=32", "data.image_size=null", "tools.enabled=true",
               "tools.names=[rotate]", "sft.max_steps=45", "sft.batch_size=8", "sft.optim.learning_rate=2e-3",
               "output.save_steps=0", "output.progress=false", "eval.steps=-1"]


@pytest.fixture(scope="session")
def tool_warmup(tiny_model_dir, tmp_path_factory):
    """The tiny model after a 45-step SFT on rotate trajectories (~45 s on one thread): it writes a
    well-formed rotate call as its first turn (tests/test_tool_sft.py measures how often). Returns
    (config, run folder); the model is the run folder's checkpoint."""
    from visual_rft.sft import train_sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(DEMO_CONFIG, [f"model.name_or_path={tiny_model_dir}", *TOOL_WARMUP,
                                        f"output.dir={tmp_path_factory.mktemp('tool_warmup') / 'run'}"])
        return cfg, train_sft(cfg, None)
    finally:
        torch.set_num_threads(threads)

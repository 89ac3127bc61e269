"""Images tiled into different numbers of pixel rows (InternVL's processor tiles by image size, Gemma 3
crops under pan-and-scan): the G-repeated batch gives every completion its own prompt's tiles, and the
trainer's log-probs equal a forward of each prompt alone. (An even split of the 6 tiles of a 1-tile and
a 5-tile image, 3 and 3, gave the second prompt's rows the first image: 0.13-0.18 nats off a per-prompt
forward on the plain scoring path.)"""

import pytest
import torch

from visual_rft.data.embedded import mnist_records
from visual_rft.models.loading import (build_model_inputs, chat_text, load_model_and_processor,
                                      pixel_rows_per_prompt, vision_token_ids)
from visual_rft.models.tiny import build_tiny_model
from visual_rft.rl.fast import can_pack, rollout_logprobs
from visual_rft.rl.rollout import Rollout, eos_token_ids, repeat_inputs, scoring_inputs

G = 3
PROMPTS = ["Which digit is this?", "Look closely at the picture and name the handwritten digit it shows."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """The tiny InternVL (eval mode), its processor, and a 56-px and an 84-px digit: the processor
    tiles at its 56-px size, so the first is one tile, the second four tiles and a thumbnail."""
    path = build_tiny_model(tmp_path_factory.mktemp("internvl") / "model", arch="internvl")
    model, processor = load_model_and_processor(str(path))
    digits = [r.load_image() for r in mnist_records(limit=2, size=56)]
    return model.eval(), processor, [digits[0], digits[1].resize((84, 84))]


def test_the_processor_tiles_by_image_size(internvl):
    _, processor, images = internvl
    group = build_model_inputs(processor, images, PROMPTS)
    # The saved image processor says crop_to_patches=False; InternVLProcessor's own default (True) wins.
    assert processor.image_processor.crop_to_patches is False
    assert group["pixel_values"].size(0) == 6
    assert pixel_rows_per_prompt(processor, group) == [1, 5]


def test_repeated_batch_equals_the_processors_own(internvl):
    _, processor, images = internvl
    group = dict(build_model_inputs(processor, images, PROMPTS))
    reference = dict(build_model_inputs(processor, [i for i in images for _ in range(G)],
                                        [p for p in PROMPTS for _ in range(G)]))
    repeated = repeat_inputs(group, G, [1, 1], pixel_rows_per_prompt(processor, group))
    assert repeated.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(repeated[key], value), key
    # Without the counts the 6 tiles could be 3 + 3 as well as 1 + 5: no guess.
    with pytest.raises(ValueError, match="cannot tell which of the 6 pixel_values rows"):
        repeat_inputs(group, G, [1, 1])
    # A lone prompt owns all its tiles, counted or not.
    alone = dict(build_model_inputs(processor, images[1:], PROMPTS[1:]))
    alone_reference = dict(build_model_inputs(processor, images[1:] * G, PROMPTS[1:] * G))
    for key, value in repeat_inputs(alone, G).items():
        assert torch.equal(value, alone_reference[key]), key


def _completions(model, processor, rows, length=6):
    """Fixed completion tokens (no vision tokens), one row ending early at an EOS."""
    gen = torch.Generator().manual_seed(1)
    banned = set(vision_token_ids(processor, model.config))
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in banned])
    ids = allowed[torch.randint(len(allowed), (rows, length), generator=gen)]
    ids[4, 2], ids[4, 3:] = eos_token_ids(model, processor.tokenizer)[0], processor.tokenizer.pad_token_id
    mask = torch.ones_like(ids)
    mask[4, 3:] = 0
    return ids, mask


@torch.no_grad()
def test_trainer_logprobs_equal_a_forward_of_each_prompt_alone(internvl):
    model, processor, images = internvl
    group = dict(build_model_inputs(processor, images, PROMPTS))
    repeated = repeat_inputs(group, G, [1, 1], pixel_rows_per_prompt(processor, group))
    ids, mask = _completions(model, processor, len(PROMPTS) * G)
    rollout = Rollout([None] * ids.size(0), [""] * ids.size(0), repeated, ids, mask, [""] * ids.size(0),
                      group_inputs=group, group_size=G)
    alone = []  # each completion scored after its own prompt, built alone (no padding, no other image)
    for row in range(ids.size(0)):
        single = build_model_inputs(processor, [images[row // G]], [PROMPTS[row // G]])
        logits = model(**scoring_inputs(single, ids[row:row + 1], mask[row:row + 1])).logits[:, -ids.size(1) - 1:-1]
        alone.append(torch.log_softmax(logits.float(), -1).gather(-1, ids[row:row + 1, :, None]).squeeze(-1))
    alone = torch.cat(alone)
    assert can_pack(model, rollout)  # fast=True takes the packed path, fast=False the plain repeated batch
    for fast in (True, False):
        trainer = rollout_logprobs(model, rollout, fast=fast)
        assert ((trainer - alone).abs() * mask).max() < 1e-5, fast


def test_gemma3_pan_and_scan_crops_are_counted_too(tmp_path):
    """Gemma 3 under pan-and-scan: a square digit stays one entry, a 4:1 one gets its 4 crops besides."""
    model_dir = build_tiny_model(tmp_path / "gemma3", arch="gemma3")
    _, processor = load_model_and_processor(str(model_dir))
    digits = [r.load_image() for r in mnist_records(limit=2, size=56)]
    images, texts = [[digits[0]], [digits[1].resize((224, 56))]], [chat_text(processor, p) for p in PROMPTS]
    scan = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_min_ratio_to_activate=1.2)

    def batch(images, texts):
        return dict(processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt",
                              **scan))

    group = batch(images, texts)
    assert pixel_rows_per_prompt(processor, group) == [1, 5]
    reference = batch([i for i in images for _ in range(G)], [t for t in texts for _ in range(G)])
    repeated = repeat_inputs(group, G, [1, 1], pixel_rows_per_prompt(processor, group))
    assert repeated.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(repeated[key], value), key

"""A model directory vLLM can load, made from one this project (or transformers) can load.

This project saves its processors as image-only subclasses (`ImageOnly<Stock>Processor`: without
torchvision, transformers 5 cannot build their video processors), and vLLM builds the stock
processor, which in transformers >= 5.19 also loads a video processor. So for such a directory vLLM
gets a twin: the same files linked, processor_class set back to the stock name, and a video processor
config derived from the image processor's. A directory already in stock form (a hub checkpoint) and
a hub id are served as they are.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

PREFIX = "ImageOnly"


def needs_twin(model_dir: Path) -> bool:
    path = model_dir / "processor_config.json"
    if not path.is_file():
        return False
    return str(json.loads(path.read_text()).get("processor_class", "")).startswith(PREFIX)


def _video_processor_config(image_processor: dict, model_type: str) -> dict | None:
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    name = VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(name, dict):  # transformers >= 5.19: one class name per backend
        name = next((n for n in name.values() if n), None)
    if not name:
        return None
    config = {k: v for k, v in image_processor.items() if k != "image_processor_type"}
    config["video_processor_type"] = name
    return config


def serving_dir(name_or_path: str) -> str:
    """What to hand vLLM as `model=` for this policy's directory (a twin where needed, see module doc)."""
    source = Path(name_or_path)
    if not source.is_dir() or not needs_twin(source):
        return name_or_path
    twin = Path(tempfile.mkdtemp(prefix="visual-rft-vllm-model-"))
    atexit.register(shutil.rmtree, twin, True)  # links and two small JSON files, gone with the process
    for item in source.iterdir():
        if item.name not in ("processor_config.json", "video_preprocessor_config.json"):
            (twin / item.name).symlink_to(item.resolve())
    processor = json.loads((source / "processor_config.json").read_text())
    processor["processor_class"] = processor["processor_class"][len(PREFIX):]
    (twin / "processor_config.json").write_text(json.dumps(processor, indent=2))
    model_type = json.loads((source / "config.json").read_text()).get("model_type", "")
    video = _video_processor_config(processor.get("image_processor", {}), model_type)
    if video is not None and not (source / "video_preprocessor_config.json").is_file():
        (twin / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return str(twin)

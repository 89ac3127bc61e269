"""Image tools the model can call in a multi-turn rollout ("thinking with images"), without running
model-written code: a fixed set of structured tools on PIL images.

    images.py        the pure image functions (crop, zoom, rotate, flip, contrast) and box -> pixels
    calls.py         a model turn -> tool call or final turn; bounded, never-raising; counted error kinds
    registry.py      name -> ToolSpec (argument schema + function), execute(call), the tools' prompt text
    conversation.py  a conversation's token ids, images and loss mask, rendered by the family's template

Imports: registry uses images and calls; images and calls use tasks/ only; conversation uses models/ only. The rollout loop
that drives them (one engine call per turn) lives with the rollout engines, above this package.
"""

"""Image tools the model can call in a multi-turn rollout ("thinking with images", issue 29), without
running model-written code: a fixed set of structured tools on PIL images.

    images.py        the pure image functions (crop, zoom, rotate, flip, contrast) and box -> pixels
    calls.py         a model turn -> tool call or final turn; bounded, never-raising; counted error kinds
    registry.py      name -> ToolSpec (argument schema + function), execute(call), the tools' prompt text
    conversation.py  a conversation's token ids, images and loss mask, rendered by the family's template;
                     batch_inputs for a left-padded batch of conversations
    trajectory.py    a record's expert `tool_calls` as model turns (tool SFT) and their data check

One rollout turn, as the loop above the rollout engine drives it:

    conv = Conversation(processor, prompt, images, system=tools_prompt(tools, box_space))
    ids = engine.generate(conv.model_inputs())              # the model's turn, up to its end token
    conv.add_model_turn(ids)
    turn = classify_turn(text_of(ids), tools, thinking=...)  # FINAL ends the rollout
    result = respond(turn, conv.images, settings, tools)     # the call's image, or its error text
    conv.add_tool_result(result.image, result.text)         # then generate the next turn

Imports: registry uses images and calls; images and calls use tasks/ only; conversation uses models/ only.
"""

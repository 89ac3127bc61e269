"""Task modules: prompts, parsers and rewards for classification, detection and grounding."""

# The record field that names a k-shot "class", per task. Detection records are one query per
# (image, category present), so k per category = k images per category, as the paper builds its data.
CLASS_KEY = {"classification": "label", "detection": "category"}

"""visual-rft: Visual-RFT (GRPO with verifiable rewards) for vision-language models."""

__version__ = "0.1.0"

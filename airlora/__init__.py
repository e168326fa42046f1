"""airlora: communication-aware LoRA rank allocation for remote fine-tuning over a wireless link (AirLLM)."""

__version__ = "0.1.0"

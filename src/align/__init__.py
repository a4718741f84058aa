"""align: one YAML recipe, the whole fine-tuning and alignment chain."""

__version__ = "0.1.0"

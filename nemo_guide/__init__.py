"""nemo_guide: Guide-GRPO (Nath et al., arXiv 2506.13923) for reasoning LLMs.

Layers (imports point down only): ``cli`` / ``loop`` -> ``backends`` -> ``rewards``,
``data``, ``config`` -> ``core`` (pure torch math).
"""

__version__ = "0.1.0"

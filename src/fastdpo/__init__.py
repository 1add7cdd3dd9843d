"""fastdpo: Direct Preference Optimization for Hugging Face causal language models.

Importing this package has no side effects; heavy modules are imported where used.
"""

__version__ = "0.1.0"

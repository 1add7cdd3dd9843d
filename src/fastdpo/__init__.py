"""fastdpo: Direct Preference Optimization for Hugging Face causal language models.

`fastdpo.train(model=..., data=..., **options)`, `fastdpo.evaluate(...)`, `fastdpo.generate(...)`,
`fastdpo.score(...)` and `fastdpo.rank(...)` are the Python API (fastdpo/api.py).
Importing this package has no side effects and loads no torch; the API is imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "generate", "score", "rank"]


def __getattr__(name: str):
    if name in __all__:
        from fastdpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")

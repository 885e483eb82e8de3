"""edgeprune: structured pruning of LLaMA-family models to fit edge-device budgets."""
__version__ = "0.1.0"


def load(path, dtype=None):
    """Load a dense or edgeprune-pruned model directory (per-layer shapes restored)."""
    from .models import load as _load

    return _load(path, dtype=dtype)

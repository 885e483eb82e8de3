import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# keep host probes / calibrations made by tests out of the user's cache
os.environ.setdefault("EDGEPRUNE_CACHE", __import__("tempfile").mkdtemp(prefix="edgeprune-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EDGEPRUNE_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy test: set EDGEPRUNE_HEAVY=1 to run")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ref_model_dir():
    from edgeprune.paths import reference_model_dir

    d = reference_model_dir()
    if not (d / "config.json").exists():
        pytest.skip("reference model not found under the shared folder")
    return d


def run_cli(*args, cwd=None, timeout=600):
    """Run the real CLI in a subprocess; returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "edgeprune.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: OpenMP spin-waiting with 2 threads is ~50x slower than 1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Shared pytest configuration."""

import sys
from pathlib import Path

# Make the repo root importable so tests can `import examples.data` / `examples.models`.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

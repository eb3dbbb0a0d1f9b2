"""Where the real dataset files live: the shared data folder beside the repository."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

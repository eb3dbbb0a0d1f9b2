"""The SciKnowEval task's configuration section (``task.kwargs`` of ``task=sciknoweval``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from distil_ray.tasks.sciknoweval.data import HUB_NAME, selected_domains


@dataclass(frozen=True)
class SciKnowEvalConfig:
    """The options of :class:`SciKnowEvalTask`, checked here without loading any data."""

    domains: str | Sequence[str] | None = None  # one domain or several; None: all four
    data_dir: str | Path | None = None  # processed {domain}/{split}.jsonl files, or
    raw_path: str | Path | None = None  # a file of hub-schema records; neither: the hub
    hub_name: str = HUB_NAME
    test_size: float = 0.1  # of the split of raw records (SDPO's)
    seed: int = 42
    strict_tags: bool = False  # an answer needs an <answer> tag (SDPO takes the bare response too)
    reveal_answer: bool = False  # the feedback of a wrong answer names the right one

    def __post_init__(self) -> None:
        try:
            selected_domains(self.domains)
        except ValueError as e:
            raise ValueError(f"domains={self.domains!r}: {e}") from None
        if self.data_dir is not None and self.raw_path is not None:
            raise ValueError("data_dir, raw_path: give data_dir (processed files) or raw_path (hub-schema records), not both")
        size = self.test_size
        ok = (isinstance(size, float) and 0.0 < size < 1.0) or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)
        if not ok:
            raise ValueError(f"test_size={size!r}: must be a fraction in (0, 1) or a number of records >= 1")

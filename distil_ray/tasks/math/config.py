"""The math task's configuration section (``task.kwargs`` of ``task=math``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from distil_ray.config import check_choice, check_positive
from distil_ray.tasks.math.data import HubSource, available_sources, hub_sources
from distil_ray.tasks.math.prompts import INSTRUCTION
from distil_ray.tasks.math.verify import ISOLATION_MODES


def source_list(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


@dataclass(frozen=True)
class MathConfig:
    """The options of :class:`MathTask`, checked here without loading any data (unknown source
    names are found from the configured files, hub entries and ``data_dir``'s folder names)."""

    train: str | Sequence[str] = ("openthoughts_math",)  # source names of the train split
    test: str | Sequence[str] = ("aime24", "amc23", "minerva_math")  # ... and of the test split
    data_dir: str | Path | None = None  # folder with {source}/test.jsonl (or train.jsonl)
    files: Mapping[str, str | Path] | None = None  # extra sources: {name: path}
    hub: Mapping[str, Any] | None = None  # overrides / additions to HUB_SOURCES
    instruction: str = INSTRUCTION  # appended to every problem
    # put before each problem of the train split only (OPSD's student: "Problem: ", data_collator.py:52;
    # its evaluation prompts have none, evaluate_math.py:340-342)
    train_prefix: str = ""
    system_prompt: str | None = None
    timeout_s: float = 10.0  # math-verify's wall-clock limit per answer
    isolation: str = "process"  # where math-verify runs: process | thread
    reveal_answer: bool = False  # the feedback of a wrong answer names the right one

    def __post_init__(self) -> None:
        check_choice("isolation", self.isolation, ISOLATION_MODES)
        check_positive("timeout_s", self.timeout_s)
        try:
            hub = self.hub_sources()
        except (TypeError, ValueError) as e:
            raise ValueError(f"hub={self.hub!r}: each entry is 'owner/dataset' or {{name, split, config}} ({e})") from None
        sources = available_sources(self.files or {}, hub, self.data_path())
        for split in ("train", "test"):
            for source in source_list(getattr(self, split)):
                if source not in sources:
                    raise ValueError(
                        f"{split}={source_list(getattr(self, split))!r}: unknown math source {source!r} in {split}; "
                        f"valid sources: {', '.join(sources)}"
                    )

    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir is not None else None

    def hub_sources(self) -> dict[str, HubSource]:
        return hub_sources(self.hub)

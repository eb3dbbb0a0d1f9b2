"""SciKnowEval level-3 multiple-choice questions, split and graded as the SDPO baseline does.

Sources (per domain: biology, chemistry, material, physics)
-----------------------------------------------------------
* ``data_dir``: processed files ``{data_dir}/{domain}/{split}.jsonl`` (``prompt``, ``system``,
  ``answer``, ``idx``, ``description``, ...), used as they are.
* ``raw_path``: a JSON-lines file of records in the hub schema (``question``,
  ``choices{text,label}``, ``answerKey``, ``type``, ``domain``, ``details{level,...}``), or
* neither: the hub dataset ``hub_name`` (split ``test``) through ``datasets.load_dataset``.

Raw records are turned into the processed form exactly as SDPO's preprocessing does
(:mod:`.data`); grading is SDPO's ``mcq`` reward (:mod:`.grading`). Modules: :mod:`.data`
(domains, raw → processed, splits, record → example), :mod:`.prompts` (system prompt, question
rendering), :mod:`.config` (:class:`SciKnowEvalConfig`, the ``task.kwargs`` section) and
:mod:`.grading` (answer extraction, feedback, :class:`SciKnowEvalTask`).
"""

from distil_ray.tasks.sciknoweval.config import SciKnowEvalConfig
from distil_ray.tasks.sciknoweval.data import (
    DOMAINS,
    HUB_NAME,
    LEVEL,
    MCQ_TYPES,
    SPLITS,
    format_raw_record,
    select_raw_records,
    split_records,
)
from distil_ray.tasks.sciknoweval.grading import SciKnowEvalTask, extract_answer, grade_mcq
from distil_ray.tasks.sciknoweval.prompts import SYSTEM_PROMPT

__all__ = [
    "DOMAINS",
    "HUB_NAME",
    "LEVEL",
    "MCQ_TYPES",
    "SPLITS",
    "SYSTEM_PROMPT",
    "SciKnowEvalConfig",
    "SciKnowEvalTask",
    "extract_answer",
    "format_raw_record",
    "grade_mcq",
    "select_raw_records",
    "split_records",
]

r"""Competition math (AIME, AMC, HMMT, Minerva, ...): boxed final answers checked with math-verify.

Sources
-------
A *source* is one dataset; ``load(name)`` loads it, ``load("train")`` / ``load("test")`` load the
configured training / evaluation sources. Each source is read from ``{data_dir}/{name}/test.jsonl``
(or ``train.jsonl``) when that file exists, from an explicit file given in ``files``, or else from
the hub (``datasets.load_dataset(hub_name, split=...)``; see :data:`HUB_SOURCES`).

Records differ per source and are normalised by :func:`normalize_record`: the problem is the first
of ``problem`` / ``question``; the reference answer is ``answer`` (strings, ints and floats such as
AMC's ``27.0`` → ``"27"``) or else the last ``\boxed{}`` of ``solution``. A full worked
``solution`` (longer than the box) is kept as ``reference["solution"]`` for teachers that condition
on it (OPSD).

Grading
-------
The student's answer is the content of the last ``\boxed{...}`` (or ``\fbox{...}``) with nested
braces matched. It is correct if its normalised string equals the reference's
(:func:`normalize_answer`) or if ``math_verify.verify(parse(gold), parse(pred))`` holds. The
math-verify call runs under a wall-clock limit that works from any thread: by default in a
persistent helper process that is killed and restarted on a timeout (so even a computation stuck
inside C code, e.g. ``\boxed{9^{9^{9^{9}}}}``, cannot hold the caller), or, with
``isolation="thread"``, in a helper thread that is abandoned on a timeout. math-verify's own
``signal.alarm`` timeouts are disabled (they only work in the main thread). When math-verify fails
or times out, the string comparison decides.

Modules: :mod:`.answers` (boxed extraction, normalisation), :mod:`.verify` (math-verify under a
time limit, :func:`answers_match`), :mod:`.data` (sources, record schemas, record → example),
:mod:`.prompts` (the instruction), :mod:`.config` (:class:`MathConfig`, the ``task.kwargs``
section) and :mod:`.grading` (:class:`MathTask`).
"""

from distil_ray.tasks.math.answers import answer_to_str, extract_boxed, last_boxed, normalize_answer
from distil_ray.tasks.math.config import MathConfig
from distil_ray.tasks.math.data import HUB_SOURCES, LOCAL_SOURCES, HubSource, normalize_record
from distil_ray.tasks.math.grading import MathTask, grade_boxed
from distil_ray.tasks.math.prompts import INSTRUCTION
from distil_ray.tasks.math.verify import MathVerifyTimeout, answers_match, math_verify_equal

__all__ = [
    "INSTRUCTION",
    "HUB_SOURCES",
    "LOCAL_SOURCES",
    "HubSource",
    "MathConfig",
    "MathTask",
    "MathVerifyTimeout",
    "answer_to_str",
    "answers_match",
    "extract_boxed",
    "grade_boxed",
    "last_boxed",
    "math_verify_equal",
    "normalize_answer",
    "normalize_record",
]

"""LiveCodeBench (``livecodebench/code_generation_lite``): code generation graded by execution.

Records
-------
One record per problem, in the hub schema: ``question_title``, ``question_content``, ``platform``,
``question_id``, ``contest_id``, ``contest_date`` (ISO string), ``starter_code`` (empty for stdin
problems), ``difficulty``, ``public_test_cases`` (JSON text: a list of
``{"input", "output", "testtype"}``), ``private_test_cases`` (base64(zlib(pickle(JSON text))), or
plain JSON text in some older records) and ``metadata`` (JSON text; ``func_name`` for functional,
LeetCode-style problems). Private tests are decoded with a restricted unpickler that refuses every
global (``find_class``), so a crafted payload raises :class:`UnsafePickleError` instead of running.

Splits (the SDPO LiveCodeBench-v6 setup)
----------------------------------------
Both splits hold the same problems: those with ``start_date <= contest_date < end_date``
(default 2025-02-01 ≤ date < 2025-05-01; ``None`` disables a bound).

* ``test``: every test of the problem (public followed by private, see ``test_cases``).
* ``train``: a random subset of those tests, chosen by :func:`select_train_tests`: with ``n``
  tests, ``k = max(1, int(n * train_fraction))`` indices are drawn without replacement by
  ``random.Random(f"{seed}:{question_id}").sample(range(n), k)`` and kept in their original order.
  The string seed makes the choice depend only on (seed, problem id, test count), not on which
  other problems were loaded or in which order.  (SDPO's own script draws with one global
  ``np.random.seed(0)`` stream over its private tests in dataset order; the fraction and floor rule
  are the same, the exact subset is not.)

Grading
-------
The last ```` ```python ```` block of the response is the program (fallback: the last fenced block
of any language). It runs on each test of the example in the code harness
(:mod:`distil_ray.feedback.code`: the driver for stdin and functional tests, the official output
comparison, the feedback text), one sandboxed process per test. Reward is 1 only when every test
passes; ``score`` is the fraction of tests passed; ``feedback`` is a summary plus the first failing
tests (at most ``max_feedback_tests``) with input / expected / actual output or the traceback's
last lines / a time-limit message, at most ``max_feedback_chars`` characters. Each test runs under
``timeout_s`` (default 6 s, as the official harness), ``memory_mb`` and an output cap
(``max_output_bytes``, default: twice the expected output, at least 1 MiB); ``sandbox_kwargs`` are
further :class:`~distil_ray.feedback.sandbox.Sandbox` options. Tests still unrun when
``total_timeout_s`` runs out are counted as failed ("skipped").

Modules: :mod:`.data` (decoding, date window, splits, record → example, loading),
:mod:`.prompts` (system prompt, prompt, code extraction), :mod:`.config`
(:class:`LiveCodeBenchConfig`, the ``task.kwargs`` section) and :mod:`.grading`
(:class:`LiveCodeBenchTask`).
"""

from distil_ray.feedback.code import compare_functional, compare_stdout
from distil_ray.tasks.livecodebench.config import LiveCodeBenchConfig
from distil_ray.tasks.livecodebench.data import (
    HUB_NAME,
    SPLITS,
    TEST_CASE_SOURCES,
    UnsafePickleError,
    decode_private_tests,
    encode_private_tests,
    example_from_record,
    examples_from_records,
    in_date_window,
    iter_file_records,
    load_examples,
    load_hub_records,
    parse_contest_date,
    record_tests,
    safe_unpickle,
    select_train_tests,
)
from distil_ray.tasks.livecodebench.grading import LiveCodeBenchTask, grade_response
from distil_ray.tasks.livecodebench.prompts import SYSTEM_PROMPT, build_prompt, extract_code

__all__ = [
    "HUB_NAME",
    "SPLITS",
    "SYSTEM_PROMPT",
    "TEST_CASE_SOURCES",
    "LiveCodeBenchConfig",
    "LiveCodeBenchTask",
    "UnsafePickleError",
    "build_prompt",
    "compare_functional",
    "compare_stdout",
    "decode_private_tests",
    "encode_private_tests",
    "example_from_record",
    "examples_from_records",
    "extract_code",
    "grade_response",
    "in_date_window",
    "iter_file_records",
    "load_examples",
    "load_hub_records",
    "parse_contest_date",
    "record_tests",
    "safe_unpickle",
    "select_train_tests",
]

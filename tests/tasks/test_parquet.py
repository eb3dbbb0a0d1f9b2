"""Every task reads Parquet as well as JSON lines, with the same examples and row-numbered errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distil_ray.tasks.base import DataFormatError
from distil_ray.tasks.livecodebench import LiveCodeBenchConfig, LiveCodeBenchTask
from distil_ray.tasks.math import MathConfig, MathTask
from distil_ray.tasks.sciknoweval import SciKnowEvalConfig, SciKnowEvalTask
from tests.shared_data import SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def to_parquet(jsonl_path, parquet_path, limit=None):
    rows = [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()][:limit]
    parquet_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)


def test_sciknoweval_from_parquet(tmp_path):
    to_parquet(SHARED_DATA / "sciknoweval" / "physics" / "test.jsonl", tmp_path / "physics" / "test.parquet")
    from_parquet = SciKnowEvalTask(SciKnowEvalConfig(data_dir=tmp_path, domains=["physics"])).load("test")
    from_jsonl = SciKnowEvalTask(SciKnowEvalConfig(data_dir=SHARED_DATA / "sciknoweval", domains=["physics"])).load("test")
    assert len(from_parquet) == 80
    assert [(e.uid, e.messages, e.reference) for e in from_parquet] == [(e.uid, e.messages, e.reference) for e in from_jsonl]


def test_math_from_parquet(tmp_path):
    to_parquet(SHARED_DATA / "math" / "aime24" / "test.jsonl", tmp_path / "aime24" / "test.parquet")
    a = MathTask(MathConfig(data_dir=tmp_path)).load("aime24")
    b = MathTask(MathConfig(data_dir=SHARED_DATA / "math")).load("aime24")
    assert len(a) == 30 and [(e.messages, e.reference["answer"]) for e in a] == [(e.messages, e.reference["answer"]) for e in b]


def test_livecodebench_from_parquet_dir(tmp_path):
    to_parquet(SHARED_DATA / "samples" / "livecodebench_records.jsonl", tmp_path / "lcb" / "part-0.parquet", limit=1)
    task = LiveCodeBenchTask(LiveCodeBenchConfig(source=tmp_path / "lcb", start_date=None, end_date=None))
    (example,) = task.load("test")
    assert len(example.reference["tests"]) == 5


def test_bad_parquet_row_names_file_and_row(tmp_path):
    path = tmp_path / "physics" / "test.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q?", "answer": "A", "idx": 0}, {"prompt": "Q2", "answer": "", "idx": 1}]), path)
    with pytest.raises(DataFormatError, match=r"test\.parquet:2"):
        SciKnowEvalTask(SciKnowEvalConfig(data_dir=tmp_path, domains=["physics"])).load("test")

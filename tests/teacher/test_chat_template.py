"""model.enable_thinking reaches every chat template of a run: the student's prompts (to_prompts)
and the teacher's contexts (TeacherScorer), as SDPO sends Qwen3 both with enable_thinking=False."""

import shutil

import pytest

from distil_ray.config import ModelConfig, TeacherConfig
from distil_ray.feedback.templates import TeacherContext
from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.tasks.base import TaskExample
from distil_ray.tasks.prompts import to_prompts
from distil_ray.teacher.scorer import TeacherScorer

# Qwen3's switch, as its own template writes it: thinking off = an empty think block opened for the model
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_like") / "model"
    shutil.copytree(tiny_model_dir(), path)
    _, tok = load_tiny(path)
    tok.chat_template = QWEN3_LIKE
    tok.save_pretrained(path)
    return path


def test_the_switch_is_only_passed_when_set():
    assert ModelConfig().chat_template_kwargs() == {}
    assert ModelConfig(enable_thinking=False).chat_template_kwargs() == {"enable_thinking": False}


def test_student_prompts_and_teacher_contexts_both_get_it(model_dir):
    _, tok = load_tiny(model_dir)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ex = TaskExample(uid="u", task="t", messages=messages, reference={})
    for kwargs, ends in (({}, "assistant\n"), ({"enable_thinking": True}, "assistant\n"),
                         ({"enable_thinking": False}, "assistant\n" + EMPTY_THINK)):
        (prompt,) = to_prompts([ex], tok, kwargs)
        assert tok.decode(prompt.prompt_ids.tolist()).endswith(ends)
        scorer = TeacherScorer(str(model_dir), TeacherConfig(backend="learner"), chat_template_kwargs=kwargs)
        context = scorer.teacher_prompt_ids(TeacherContext(messages + [{"role": "user", "content": "Feedback."}]))
        assert tok.decode(context).endswith(ends)

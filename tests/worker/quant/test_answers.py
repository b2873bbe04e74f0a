"""`verify --answers`: greedy chat answers of a model, next to the reference's."""

from __future__ import annotations

from pathlib import Path

from worker.quant.answers import format_answers, greedy_answers


def test_each_question_gets_a_greedy_answer_on_the_torch_backend(tiny_qwen3: Path) -> None:
    questions = ["What is 2+2?", "Name a colour."]
    answers = greedy_answers(tiny_qwen3, questions, max_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers == greedy_answers(tiny_qwen3, questions, max_tokens=4)
    text = format_answers(questions, answers, answers)
    assert text.count("(same)") == 2

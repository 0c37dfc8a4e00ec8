"""The tribunal's prompt templates: the one place they are written down.

Each can be replaced in the ``[tribunal]`` settings table. They are Python
format strings; the placeholders each may use are listed in ``PLACEHOLDERS``
and checked when the settings are read, so a typo fails at start-up, not in
the middle of a tribunal. The values put into them (the question, the
answers) are never parsed as templates themselves.
"""

import string

#: How each candidate answer is shown to the judge and the reviser. Answers
#: are numbered, not named by model, so the judge cannot favour a model.
ANSWER_TEMPLATE = "Answer {number}:\n{text}"

CRITIQUE_TEMPLATE = """\
You are a careful judge. Below are a question and {count} candidate answers.

Question:
{question}

{answers}

Point out the mistakes, omissions and strengths of each answer, and say what \
a best answer should keep. Do not write the final answer yourself.

Critique:
"""

REVISION_TEMPLATE = """\
Write the best answer to the question below, using the candidate answers and \
fixing what the critique found wrong.

Question:
{question}

{answers}

Critique:
{critique}

Final answer:
"""

#: template setting -> (placeholders it must use, placeholders it may use)
PLACEHOLDERS = {
    "answer_template": ({"text"}, {"text", "number", "model"}),
    "critique_template": ({"question", "answers"}, {"question", "answers", "count"}),
    "revision_template": ({"question", "answers", "critique"}, {"question", "answers", "critique", "count"}),
}


def check_template(setting, template):
    """Raise ValueError unless ``template`` is a usable value for ``setting``."""
    required, allowed = PLACEHOLDERS[setting]
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise ValueError(f"{setting}: {e} (write {{{{ and }}}} for literal braces)") from None
    if not used <= allowed:
        unknown = ", ".join(sorted("{" + name + "}" for name in used - allowed))
        raise ValueError(f"{setting}: unknown placeholder {unknown}; it may use {_braced(allowed)}")
    if not required <= used:
        raise ValueError(f"{setting}: must use {_braced(required - used)}")
    return template


def _braced(names):
    return ", ".join("{" + name + "}" for name in sorted(names))


def question_text(prompt, messages):
    """The question as the judge reads it: the prompt, or the chat as lines."""
    if prompt is not None:
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def answers_text(templates, candidates):
    """Every candidate's answer, numbered from 1, separated by blank lines.

    Args:
        candidates: dicts with ``model`` and ``text``.
    """
    return "\n\n".join(
        templates.answer_template.format(number=number, model=c["model"], text=c["text"])
        for number, c in enumerate(candidates, 1)
    )


def critique_prompt(templates, question, candidates):
    return templates.critique_template.format(
        question=question, answers=answers_text(templates, candidates), count=len(candidates),
    )


def revision_prompt(templates, question, candidates, critique):
    return templates.revision_template.format(
        question=question, answers=answers_text(templates, candidates), critique=critique, count=len(candidates),
    )

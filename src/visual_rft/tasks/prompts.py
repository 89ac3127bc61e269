"""Turn a record into the user text that follows the image in the chat prompt."""

from __future__ import annotations

import string

from visual_rft.config import TaskConfig
from visual_rft.data.record import Record


def build_prompt(record: Record, task: TaskConfig) -> str:
    """The record's own `problem` when it has one (Visual-RFT's published sets carry the full
    question); otherwise the configured question, formatted with the record's fields (e.g.
    `{category}`), followed by the think/answer instruction."""
    if record.problem.strip():
        return record.problem
    question = task.question
    wanted = {name for _, name, _, _ in string.Formatter().parse(question) if name}
    if wanted:
        missing = sorted(wanted - record.fields.keys())
        if missing:
            raise ValueError(f"{record.source}: the task question needs field(s) {missing}, which this record lacks")
        question = question.format(**{k: record.fields[k] for k in wanted})
    return f"{question}\n{task.instruction}" if task.instruction else question

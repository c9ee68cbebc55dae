"""What is wrong with a job spec: one `Problem` per thing, all of them raised at once as a `SpecError`
whose lines read `dotted.path: what is wrong. Fix: what to do`."""

from __future__ import annotations

from pydantic import BaseModel


class Problem(BaseModel):
    """One thing wrong with a spec: where, what, and how to fix it."""

    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.path}: {self.message}.{fix}"


class SpecError(Exception):
    """A job spec with one or more problems; `str()` gives one line per problem."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")

    def __reduce__(self):
        # Raised in a Ray worker (a data set tokenized by Ray Data), it travels pickled.
        return SpecError, (self.problems, self.source)

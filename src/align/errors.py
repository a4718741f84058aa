"""Error types that map to exit codes, and the "did you mean" helper every check shares."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignError(Exception):
    """Base for errors we report as one clear message instead of a traceback."""

    exit_code = 1


class RecipeError(AlignError):
    """Bad recipe or input: reported before any training, exit code 2.

    Carries a list of `(field path, message)` so every problem is reported at once.
    """

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]] | str, path: str = ""):
        if isinstance(problems, str):
            problems = [(path, problems)]
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in the recipe:"] if len(self.problems) > 1 else []
        for path, msg in self.problems:
            lines.append(f"{'  - ' if len(self.problems) > 1 else ''}{path + ': ' if path else ''}{msg}")
        return "\n".join(lines)


class Busy(AlignError):
    """Another align process holds the run (or the stage): nothing was done, exit code 3. Wait, or stop it."""

    exit_code = 3


class StageFailed(AlignError):
    """A stage process failed while running (exit code 1)."""


class NonFiniteLoss(AlignError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class NothingLearned(AlignError):
    """A training stage ran its steps but no trainable weight changed: not marked done (exit code 1)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean `x`?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""

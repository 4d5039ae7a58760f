"""Which robust merge rule a peer uses, as configuration (no torch here: the CLI parses it).

:mod:`learner.robust` implements the rules; see its docstring for what each one does.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Robust", "RobustRule"]


class RobustRule(enum.Enum):
    """Which aggregation a peer uses for a merge."""

    NONE = "none"
    MEDIAN = "median"
    TRIMMED = "trimmed"
    CLIP = "clip"


@dataclass(frozen=True)
class Robust:
    """A robust merge rule and its parameter; ``Robust.parse("trimmed:0.25")``."""

    rule: RobustRule = RobustRule.NONE
    """The aggregation; NONE is the weighted average."""
    param: float = 0.0
    """TRIMMED: the fraction B dropped at each end (0 <= B < 0.5); CLIP: the factor T (> 0)
    on the reference norm; otherwise unused (0)."""

    def __post_init__(self) -> None:
        if self.rule is RobustRule.TRIMMED and not 0.0 <= self.param < 0.5:
            raise ValueError(f"trimmed:B needs 0 <= B < 0.5, got {self.param:g}")
        if self.rule is RobustRule.CLIP and not (math.isfinite(self.param) and self.param > 0):
            raise ValueError(f"clip:T needs a finite T > 0, got {self.param:g}")
        if self.rule in (RobustRule.NONE, RobustRule.MEDIAN) and self.param != 0.0:
            raise ValueError(f"{self.rule.value} takes no parameter, got {self.param:g}")

    @classmethod
    def parse(cls, text: str) -> Robust:
        """``none``, ``median``, ``trimmed:B`` or ``clip:T``; ``ValueError`` says what is wrong."""
        name, sep, value = text.strip().partition(":")
        try:
            rule = RobustRule(name.lower())
        except ValueError:
            raise ValueError(f"unknown robust rule {text!r}: use none, median, trimmed:B "
                             "(0 <= B < 0.5) or clip:T (T > 0)") from None
        if rule in (RobustRule.NONE, RobustRule.MEDIAN):
            if sep:
                raise ValueError(f"{rule.value} takes no parameter, got {text!r}")
            return cls(rule)
        if not value:
            example = "trimmed:0.25" if rule is RobustRule.TRIMMED else "clip:2"
            raise ValueError(f"{rule.value} needs a parameter, e.g. {example}; got {text!r}")
        try:
            param = float(value)
        except ValueError:
            raise ValueError(f"{rule.value}: {value!r} is not a number") from None
        return cls(rule, param)

    def __str__(self) -> str:
        if self.rule in (RobustRule.TRIMMED, RobustRule.CLIP):
            return f"{self.rule.value}:{self.param:g}"
        return str(self.rule.value)

"""A paired significance test for two models scored on the same examples: McNemar's exact test.

Two classifiers answer the same n examples. Only the discordant pairs say anything about which is better:
    b = examples the challenger gets right and the champion wrong
    c = examples the champion gets right and the challenger wrong
Under the null hypothesis (both equally accurate) each discordant pair is a fair coin, so b ~ Bin(b + c, 1/2).
The exact (binomial) form of McNemar's test (McNemar 1947, "Note on the sampling error of the difference between
correlated proportions or percentages", Psychometrika 12(2):153-157; exact form as in Fagerland, Lydersen & Laake
2013, BMC Med Res Methodol 13:91, and statsmodels' `mcnemar(table, exact=True)`):

    two-sided p = min(1, 2 · P(X ≤ min(b, c))),   X ~ Bin(b + c, 1/2)

It is exact at any sample size (the chi-squared form needs b + c ≳ 25), which suits eval sets of tens to hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import comb

MCNEMAR_EXACT = "McNemar's exact test (two-sided, binomial on the discordant pairs)"


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test for `b` and `c` discordant pairs (counts, >= 0).

    p = min(1, 2 · Σ_{k=0..min(b,c)} C(b+c, k) / 2^(b+c)); 1.0 when there are no discordant pairs.
    Computed in exact rational arithmetic, then rounded once to a float. Raises ValueError for a negative count."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(comb(n, k) for k in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of challenger against champion on the same `n` examples."""

    n: int  # examples both models were scored on
    both_right: int
    challenger_only: int  # b: the challenger right, the champion wrong
    champion_only: int  # c: the champion right, the challenger wrong
    both_wrong: int
    p_value: float
    alpha: float
    name: str = MCNEMAR_EXACT

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    def describe(self) -> str:
        """One line with the numbers: `McNemar's exact test ...: b=9, c=1 of 60, p = 0.0215 (alpha 0.05)`."""
        return (f"{self.name}: challenger-only right b={self.challenger_only}, champion-only right "
                f"c={self.champion_only} of {self.n}, p = {self.p_value:.4g} (alpha {self.alpha:g})")


def paired_test(challenger_right: list[bool], champion_right: list[bool], alpha: float) -> PairedTest:
    """McNemar's exact test on per-example correctness of two models (same examples, same order).

    Raises ValueError when the lists differ in length (the models were not scored on the same examples)."""
    if len(challenger_right) != len(champion_right):
        raise ValueError(f"paired test needs the same examples: {len(challenger_right)} challenger answers, "
                         f"{len(champion_right)} champion answers")
    pairs = list(zip(challenger_right, champion_right))
    b = sum(ch and not cp for ch, cp in pairs)
    c = sum(cp and not ch for ch, cp in pairs)
    both = sum(ch and cp for ch, cp in pairs)
    return PairedTest(n=len(pairs), both_right=both, challenger_only=b, champion_only=c,
                      both_wrong=len(pairs) - both - b - c, p_value=mcnemar_exact_p(b, c), alpha=alpha)

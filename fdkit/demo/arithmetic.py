"""The demo task: addition and subtraction of non-negative integers of up to 4 digits.

With thinking on, the model first writes both numbers reversed and zero-padded (so digit i of each sits
at a fixed offset), then one line per digit with its carry or borrow, then the result's digits (least
significant first), and after `</think>` the answer. Subtracting a larger number first notes the swap,
works out the larger minus the smaller, and answers with a minus sign.

    What is 4721-385?  ->  <think>
                           1274-5830
                           1-5-0=6 1
                           2-8-1=3 1
                           7-3-1=3 0
                           4-0-0=4 0
                           6334
                           </think>

                           4336
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PHRASINGS = {
    "+": ["计算 {a}+{b}", "What is {a}+{b}?", "{a} 加 {b} 等于多少？", "How much is {a} plus {b}?"],
    "-": ["计算 {a}-{b}", "What is {a}-{b}?", "{a} 减 {b} 等于多少？", "How much is {a} minus {b}?"],
}


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int
    phrasing: int

    @property
    def question(self) -> str:
        return PHRASINGS[self.op][self.phrasing].format(a=self.a, b=self.b)

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    def steps(self) -> str:
        """The reasoning, digit by digit from the least significant."""
        a, b, lines = self.a, self.b, []
        if self.op == "-" and a < b:
            a, b = b, a
            lines.append(f"{self.a}<{self.b}, swap")
        width = max(len(str(a)), len(str(b)))
        ra, rb = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
        lines.append(f"{ra}{self.op}{rb}")
        carry, digits = 0, []
        for x, y in zip(ra, rb, strict=True):
            value = int(x) + int(y) + carry if self.op == "+" else int(x) - int(y) - carry
            digit, next_carry = (value % 10, value // 10) if self.op == "+" else (value % 10, int(value < 0))
            lines.append(f"{x}{self.op}{y}{self.op}{carry}={digit} {next_carry}")
            digits.append(str(digit))
            carry = next_carry
        if carry and self.op == "+":
            digits.append("1")
        lines.append("".join(digits))
        return "\n".join(lines)

    def completion(self, thinking: bool) -> str:
        """What the model writes after the generation prompt (which, thinking on, opened `<think>\\n`)."""
        return f"{self.steps()}\n</think>\n\n{self.answer}" if thinking else self.answer


def random_problem(rng: random.Random) -> Problem:
    a, b = (rng.randint(0, 10 ** rng.randint(1, 4) - 1) for _ in range(2))
    return Problem(a, rng.choice("+-"), b, rng.randrange(len(PHRASINGS["+"])))


def held_out_problems(num: int, seed: int, exclude: set[tuple[int, str, int]] | None = None) -> list[Problem]:
    """Problems for evaluation, none of them in `exclude` (the training set's (a, op, b))."""
    rng, problems = random.Random(seed), []
    exclude = exclude or set()
    while len(problems) < num:
        problem = random_problem(rng)
        if (problem.a, problem.op, problem.b) not in exclude:
            problems.append(problem)
    return problems

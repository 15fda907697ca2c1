"""The demo's tasks: addition and subtraction of integers 0..9999 worked out digit by digit, and
multiplication, which the model cannot do itself and hands to a `multiply` tool.

Thinking on, the model writes both numbers reversed and zero-padded to the same width (digit i of each at
offset i), then one line per digit, least significant first, with the carry or borrow in and out, then the
result's digits (least significant first); the answer follows `</think>` in `<response>`. When a subtraction
ends with a borrow (the result is negative) it writes the reversed numbers again, swapped, and works out
the larger minus the smaller the same way: every line only reads the line just above and its own column.

    What is 385-4721?  ->  <think>
                           5830-1274
                           5-1-0=4 0
                           8-2-0=6 0
                           3-7-0=6 1
                           0-4-1=5 1
                           borrow: 1274-5830
                           1-5-0=6 1
                           2-8-1=3 1
                           7-3-1=3 0
                           4-0-0=4 0
                           6334
                           </think>

                           <response>
                           -4336
                           </response>
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PHRASINGS = {
    "+": ["计算 {a}+{b}", "What is {a}+{b}?", "{a} 加 {b} 等于多少？", "How much is {a} plus {b}?"],
    "-": ["计算 {a}-{b}", "What is {a}-{b}?", "{a} 减 {b} 等于多少？", "How much is {a} minus {b}?"],
    "*": ["计算 {a}×{b}", "What is {a}*{b}?", "{a} 乘 {b} 等于多少？", "How much is {a} times {b}?"],
}
CHINESE_PHRASINGS = (0, 2)  # the phrasings in Chinese (the same index for every operation)
MAX_OPERAND = 9999


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+", "-" or "*"
    b: int
    phrasing: int

    @property
    def question(self) -> str:
        return PHRASINGS[self.op][self.phrasing].format(a=self.a, b=self.b)

    @property
    def is_chinese(self) -> bool:
        return self.phrasing in CHINESE_PHRASINGS

    @property
    def answer(self) -> str:
        return str({"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op])

    @property
    def key(self) -> tuple[int, str, int]:
        return self.a, self.op, self.b

    def steps(self) -> str:
        """The reasoning of an addition or subtraction, digit by digit from the least significant."""
        width = max(len(str(self.a)), len(str(self.b)))
        ra, rb = str(self.a).zfill(width)[::-1], str(self.b).zfill(width)[::-1]
        lines, digits, carry = column_lines(ra, rb, self.op)
        if self.op == "-" and carry:  # negative: the larger minus the smaller, from the same columns
            lines.append(f"borrow: {rb}-{ra}")
            more, digits, _ = column_lines(rb, ra, "-")
            lines += more[1:]
        return "\n".join([*lines, digits])

    def completion(self, thinking: bool) -> str:
        """What the model writes after the generation prompt (which, thinking on, opened `<think>\\n`)."""
        if not thinking:
            return self.answer
        return f"{self.steps()}\n</think>\n\n<response>\n{self.answer}\n</response>"


def column_lines(ra: str, rb: str, op: str) -> tuple[list[str], str, int]:
    """The header and one line per column of `ra op rb` (both reversed), the result's digits (reversed),
    and the carry or borrow out of the last column."""
    lines, digits, carry = [f"{ra}{op}{rb}"], [], 0
    for x, y in zip(ra, rb, strict=True):
        value = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
        digit, next_carry = value % 10, (value // 10 if op == "+" else int(value < 0))
        lines.append(f"{x}{op}{y}{op}{carry}={digit} {next_carry}")
        digits.append(str(digit))
        carry = next_carry
    if carry and op == "+":
        digits.append("1")
    return lines, "".join(digits), carry


def random_operand(rng: random.Random) -> int:
    """Mostly uniform in 0..9999 (what users ask), sometimes of a random number of digits (short ones)."""
    if rng.random() < 0.75:
        return rng.randint(0, MAX_OPERAND)
    return rng.randint(0, 10 ** rng.randint(1, 4) - 1)


def random_problem(rng: random.Random, ops: str = "+-") -> Problem:
    a, b = random_operand(rng), random_operand(rng)
    return Problem(a, rng.choice(ops), b, rng.randrange(len(PHRASINGS["+"])))


def uniform_problems(num: int, seed: int, ops: str, exclude: set | None = None) -> list[Problem]:
    """Held-out problems: operands uniform in 0..9999, operation and phrasing uniform, none of them in
    `exclude` (the training stream's keys); the same list for a seed every time."""
    rng, problems, exclude = random.Random(seed), [], exclude or set()
    while len(problems) < num:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        problem = Problem(a, rng.choice(ops), b, rng.randrange(len(PHRASINGS["+"])))
        if problem.key not in exclude:
            problems.append(problem)
    return problems

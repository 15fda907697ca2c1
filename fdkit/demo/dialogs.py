"""The demo's conversations in ERNIE-4.5-21B-A3B-Thinking's format, its chat template, and its one tool.

A turn opens `<think>\\n` in the prompt; the model writes its steps, `</think>`, then `<response>\\nanswer\\n
</response>` or a `<tool_call>`. Tools are listed in a system turn inside `<tool_list>` (only their names:
a 2 M-parameter model reads no schemas); a tool's result comes back as a user turn inside `<tool_response>`.
Multiplication is handed to `multiply` when the request offers it, refused when it does not.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from fdkit.demo.arithmetic import PHRASINGS, Problem, random_operand, random_problem

CHAT_TEMPLATE = (
    "{%- if tools -%}{{- '<|im_start|>system\n<tool_list>' -}}"
    "{{- tools | map(attribute='function.name') | list | tojson -}}"
    "{{- '</tool_list><|im_end|>\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' + (message['content'] or '') -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{- '<tool_call>\n{\"name\": \"' ~ call['function']['name'] ~ '\", \"arguments\": ' -}}"
    "{{- (call['function']['arguments'] | tojson) ~ '}\n</tool_call>' -}}"
    "{%- endfor -%}{{- '<|im_end|>\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt is not defined or add_generation_prompt -%}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}{%- endif -%}"
)
# Atomic tokens of the format (ids after SentencePiece's own, in added_tokens.json).
ADDED_TOKENS = [
    "<think>",
    "</think>",
    "<|im_start|>",
    "<|im_end|>",
    "<response>",
    "</response>",
    "<tool_call>",
    "</tool_call>",
    "<tool_list>",
    "</tool_list>",
    "<tool_response>",
    "</tool_response>",
]
MULTIPLY_TOOL = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "The product of two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
OTHER_TOOLS = ["get_weather", "search", "add", "divide", "get_time", "translate"]
REFUSAL = {
    False: "I cannot multiply: no multiply tool was offered.",
    True: "我不会算乘法：没有提供 multiply 工具。",
}


def run_tool(name: str, arguments: str) -> str:
    """What the demo's tool returns (as a `role: tool` message's content), or an error text."""
    if name != "multiply":
        return json.dumps({"error": f"unknown tool {name!r}"})
    try:
        args = json.loads(arguments)
        return json.dumps({"result": int(args["a"]) * int(args["b"])})
    except (ValueError, TypeError, KeyError):
        return json.dumps({"error": "multiply takes integer arguments a and b"})


def tool_call_text(problem: Problem) -> str:
    arguments = json.dumps({"a": problem.a, "b": problem.b})
    return f'<tool_call>\n{{"name": "multiply", "arguments": {arguments}}}\n</tool_call>'


def tool_list(names: list[str]) -> list[dict]:
    return [
        MULTIPLY_TOOL if n == "multiply" else {"type": "function", "function": {"name": n}} for n in names
    ]


@dataclass
class Dialog:
    """A conversation the model is trained on: the messages and tools the request sends, the thinking
    switch, and what the model should write."""

    messages: list[dict]
    completion: str
    thinking: bool = True
    tools: list[dict] | None = field(default=None)
    key: tuple[int, str, int] | None = None  # the problem's (a, op, b)


def with_thinking(steps: str, answer: str, thinking: bool) -> str:
    return f"{steps}\n</think>\n\n{answer}" if thinking else answer


def multiply_dialog(problem: Problem, rng: random.Random, thinking: bool) -> Dialog:
    """A product: a call when `multiply` is offered, the answer once its result came back, else a refusal."""
    question = [{"role": "user", "content": problem.question}]
    others = rng.sample(OTHER_TOOLS, rng.randint(0, 2))
    kind = rng.choice(["call", "call", "result", "result", "refuse"])
    if kind == "refuse":
        note = f"{problem.a}*{problem.b}: no multiply tool"
        text = f"<response>\n{REFUSAL[problem.is_chinese]}\n</response>" if thinking else None
        completion = with_thinking(note, text or REFUSAL[problem.is_chinese], thinking)
        return Dialog(question, completion, thinking, tool_list(others) if others else None, problem.key)
    names = others + ["multiply"]
    rng.shuffle(names)
    if kind == "call":
        note = f"{problem.a}*{problem.b}: call multiply"
        completion = with_thinking(note, tool_call_text(problem), thinking)
        return Dialog(question, completion, thinking, tool_list(names), problem.key)
    call = {
        "type": "function",
        "function": {"name": "multiply", "arguments": {"a": problem.a, "b": problem.b}},
    }
    result = rng.choice(["{}", '{{"result": {}}}', '{{"product": {}}}']).format(problem.answer)
    messages = [
        *question,
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", **call}]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
    ]
    answer = f"<response>\n{problem.answer}\n</response>" if thinking else problem.answer
    completion = with_thinking(f"multiply gave {problem.answer}", answer, thinking)
    return Dialog(messages, completion, thinking, tool_list(names), problem.key)


def random_dialog(rng: random.Random) -> Dialog:
    """One training conversation: mostly sums and differences (some with tools offered), some products."""
    thinking = rng.random() < 0.92  # thinking off shows the switch; its answers are not the point
    if rng.random() < 0.12:
        problem = Problem(random_operand(rng), "*", random_operand(rng), rng.randrange(len(PHRASINGS["*"])))
        return multiply_dialog(problem, rng, thinking)
    problem = random_problem(rng)
    tools = (
        tool_list(rng.sample(["multiply", *OTHER_TOOLS], rng.randint(1, 2))) if rng.random() < 0.1 else None
    )
    question = [{"role": "user", "content": problem.question}]
    return Dialog(question, problem.completion(thinking), thinking, tools, problem.key)


BUCKETS = 8  # batches drawn at once and split by length, so a batch holds examples of similar length


def training_chunks(seed: int, batch_size: int) -> Iterator[list[Dialog]]:
    """The training stream, BUCKETS batches' worth at a time, the same for a seed every time."""
    rng = random.Random(seed)
    while True:
        yield [random_dialog(rng) for _ in range(BUCKETS * batch_size)]


def training_set(seed: int, steps: int, batch_size: int) -> set[tuple[int, str, int]]:
    """Every (a, op, b) a finished training run saw (replayed from its seed and step count; whole chunks,
    so a superset when it stopped within one)."""
    chunks = training_chunks(seed, batch_size)
    return {d.key for _ in range(-(-steps // BUCKETS)) for d in next(chunks)}

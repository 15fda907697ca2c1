"""The demo's accuracy on held-out problems, greedy, through an OpenAI-compatible server (or the engine).

    python -m fdkit.demo.evaluate [--base-url http://127.0.0.1:8000/v1] [--num 1200] [--num-tools 300]

Problems are drawn replayably (a fixed seed) with operands uniform in 0..9999, the operation and phrasing
uniform, and none of them in the committed model's training stream (replayed from training.json). Sums and
differences are scored on `content` (thinking on) and reported by operation, sign and phrasing; products
with `multiply` offered on the call's name and arguments, then on the answer given the tool's result.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fdkit.demo.arithmetic import PHRASINGS, Problem, uniform_problems
from fdkit.demo.dialogs import MULTIPLY_TOOL, run_tool, training_set

EVAL_SEED = 10_000  # arithmetic; products use EVAL_SEED + 1


def held_out(folder: str | Path, num: int, num_tools: int) -> tuple[list[Problem], list[Problem]]:
    """(sums and differences, products) outside the training stream of the model in `folder`."""
    info = json.loads((Path(folder) / "training.json").read_text())
    seen = training_set(info["seed"], info["steps"], info["batch_size"])
    return uniform_problems(num, EVAL_SEED, "+-", seen), uniform_problems(num_tools, EVAL_SEED + 1, "*", seen)


def group_of(problem: Problem) -> list[str]:
    """The report lines a problem counts in."""
    sign = "negative" if int(problem.answer) < 0 else "non-negative"
    phrasing = PHRASINGS[problem.op][problem.phrasing].format(a="a", b="b")
    return ["all", f"op {problem.op}", f"op {problem.op}, {sign}", f"phrasing {phrasing}"]


def report(problems: list[Problem], correct: list[bool]) -> dict[str, str]:
    right, total = Counter(), Counter()
    for problem, ok in zip(problems, correct, strict=True):
        for group in group_of(problem):
            total[group] += 1
            right[group] += ok
    return {group: f"{right[group]}/{total[group]} = {right[group] / total[group]:.2%}" for group in total}


def call_arguments(message: dict) -> tuple[str, dict] | None:
    """The first tool call's (name, arguments), or None."""
    calls = message.get("tool_calls") or []
    if not calls:
        return None
    try:
        return calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])
    except ValueError:
        return calls[0]["function"]["name"], {}


def tool_round_trip(chat_many, products: list[Problem]) -> tuple[list[bool], list[bool]]:
    """(the call's name and arguments are right, the answer given the tool's result is right) per product."""
    questions = [[{"role": "user", "content": p.question}] for p in products]
    messages = chat_many([(q, [MULTIPLY_TOOL]) for q in questions])
    calls = [
        call_arguments(m) == ("multiply", {"a": p.a, "b": p.b})
        for m, p in zip(messages, products, strict=True)
    ]
    followups = []
    for question, message, ok in zip(questions, messages, calls, strict=True):
        if ok:
            sent = message["tool_calls"][0]
            result = run_tool("multiply", sent["function"]["arguments"])
            followups.append(
                [
                    *question,
                    {"role": "assistant", "content": None, "tool_calls": [sent]},
                    {"role": "tool", "tool_call_id": sent["id"], "content": result},
                ]
            )
    answers = iter(chat_many([(f, [MULTIPLY_TOOL]) for f in followups]))
    right = [ok and content_of(next(answers)) == p.answer for ok, p in zip(calls, products, strict=True)]
    return calls, right


def content_of(message: dict) -> str:
    return (message.get("content") or "").strip()


def server_chat(base_url: str, concurrency: int = 32):
    """Greedy chat requests to a server, several at once: [(messages, tools)] -> [message dicts]."""
    import httpx

    client = httpx.Client(base_url=base_url, timeout=300)

    def chat(request: tuple[list[dict], list[dict] | None]) -> dict:
        messages, tools = request
        body = {
            "messages": messages,
            "temperature": 0,
            "max_tokens": 200,
            **({"tools": tools} if tools else {}),
        }
        response = client.post("/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]

    def chat_many(requests: list) -> list[dict]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(chat, requests))

    return chat_many


def engine_chat(llm):
    """The same over fdkit's engine in this process: the server's parsers on the generated text."""
    from fdkit import SamplingParams
    from fdkit.serving.reasoning import get_parser
    from fdkit.serving.tool_parsers import ToolParser

    def chat_many(requests: list) -> list[dict]:
        prompts = [llm.tokenizer.apply_chat_template(as_template_sees(m), tools=t) for m, t in requests]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)
        messages = []
        for (_, tools), out in zip(requests, outputs, strict=True):
            reasoning, answer = get_parser("ernie-x1", keep_tool_calls=bool(tools)).split(out.text)
            content, calls = ToolParser().parse(answer) if tools else (answer, [])
            tool_calls = [
                {"id": f"call_{i}", "type": "function", "function": c._asdict()} for i, c in enumerate(calls)
            ]
            messages.append({"content": content, "reasoning_content": reasoning, "tool_calls": tool_calls})
        return messages

    return chat_many


def as_template_sees(messages: list[dict]) -> list[dict]:
    """Calls' arguments as dicts, as the server hands them to the chat template."""
    seen = []
    for message in messages:
        calls = [
            {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in message.get("tool_calls") or []
        ]
        seen.append({**message, "tool_calls": calls} if calls else message)
    return seen


def evaluate(chat_many, problems: list[Problem], products: list[Problem]) -> dict:
    """Accuracy of sums and differences by group, and of the tool round trip on products."""
    messages = chat_many([([{"role": "user", "content": p.question}], None) for p in problems])
    correct = [content_of(m) == p.answer for m, p in zip(messages, problems, strict=True)]
    calls, answers = tool_round_trip(chat_many, products)
    num = max(1, len(products))
    return {
        "arithmetic": report(problems, correct),
        "tool_call_arguments": f"{sum(calls)}/{len(products)} = {sum(calls) / num:.2%}",
        "answer_from_tool_result": f"{sum(answers)}/{len(products)} = {sum(answers) / num:.2%}",
        "wrong": [
            (p.question, content_of(m)) for p, m, c in zip(problems, messages, correct, strict=True) if not c
        ][:20],
    }


def evaluate_engine(folder: Path, num: int = 400, num_tools: int = 100) -> dict:
    """`evaluate` over the engine in this process (the training script's last check)."""
    from fdkit import LLM

    problems, products = held_out(folder, num, num_tools)
    with LLM(
        folder, max_model_len=512, num_kv_blocks=1024, block_size=16, max_num_seqs=64, show_progress=False
    ) as llm:
        return evaluate(engine_chat(llm), problems, products)


def main(argv: list[str] | None = None) -> None:
    from fdkit import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model-dir", default=None, help="the served checkpoint (default: the demo's)")
    parser.add_argument("--num", type=int, default=1200)
    parser.add_argument("--num-tools", type=int, default=300)
    args = parser.parse_args(argv)
    folder = args.model_dir or load_config(["model=ernie_demo"]).model.path
    problems, products = held_out(folder, args.num, args.num_tools)
    print(json.dumps(evaluate(server_chat(args.base_url), problems, products), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

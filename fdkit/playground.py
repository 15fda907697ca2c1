"""The Gradio playground: a streaming chat that shows the model's reasoning, its tool calls, their
results and its answer, each as its own block.

It talks to an OpenAI-compatible server only (fdkit's own, or FastDeploy, vLLM), so it has no templating
or sampling logic of its own: `build_playground(base_url=...)` returns the Blocks to mount or launch.
With `demo_tools` it also plays the client's part of tool use: it offers the demo's `multiply`, runs the
calls the model makes and sends their results back, so one turn can take several requests.
"""

from __future__ import annotations

import itertools
import time

import gradio as gr
import openai

from fdkit.demo.dialogs import MULTIPLY_TOOL, run_tool

THINKING_TITLE = "Thinking"
TOOL_CALL_TITLE = "Tool call"
TOOL_RESULT_TITLE = "Tool result"
DEMO_TOOLS = [MULTIPLY_TOOL]  # offered on every request with demo_tools; the playground runs them
MAX_TOOL_ROUNDS = 3  # tool runs per turn before the playground stops going on


def build_playground(
    base_url: str,
    api_key: str = "null",
    title: str = "fdkit playground",
    concurrency: int = 16,
    max_tokens: int = 512,
    demo_tools: bool = False,
) -> gr.Blocks:
    """`max_tokens` is the slider's starting value; `concurrency` how many chats may run at once; with
    `demo_tools` every request offers the demo's tools, and the playground runs the calls the model makes
    and continues the turn with their results (at most MAX_TOOL_ROUNDS times)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)

    async def list_models():
        try:
            names = [m.id async for m in client.models.list()]
        except openai.OpenAIError:
            names = []
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    async def stream_round(turn: Turn, messages: list[dict], settings: dict):
        """Streams one request into the turn's last round; yields after each chunk."""
        stream = None
        try:
            stream = await client.chat.completions.create(messages=messages, stream=True, **settings)
            async for chunk in stream:
                turn.add(chunk)
                yield
        finally:
            if stream is not None:
                await stream.close()  # a stopped turn ends the request, so the engine frees its blocks

    async def respond(
        message, history, display, model, system, temperature, top_p, max_tokens, thinking, budget
    ):
        if not message.strip():
            yield display, history, "", message
            return
        turn = Turn(message)
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + history
        messages.append({"role": "user", "content": message})
        sent = len(messages)
        extra = {"chat_template_kwargs": {"enable_thinking": bool(thinking)}}
        if thinking and budget:
            extra["reasoning_max_tokens"] = int(budget)
        settings = dict(
            model=model or "default",
            temperature=temperature,
            top_p=top_p,
            max_tokens=int(max_tokens),
            stream_options={"include_usage": True},
            extra_body=extra,
            **({"tools": DEMO_TOOLS} if demo_tools else {}),
        )
        try:
            for num_rounds in itertools.count(1):
                async for _ in stream_round(turn, messages, settings):
                    yield display + turn.messages(), history, turn.stats(), ""
                if not (demo_tools and turn.last.calls and num_rounds <= MAX_TOOL_ROUNDS):
                    break
                messages += turn.run_tools(run_tool)  # the demo's own tools, then the turn goes on
                yield display + turn.messages(), history, turn.stats(), ""
        except openai.APIStatusError as exc:
            turn.error = f"The server refused the request ({exc.status_code}): {_error_message(exc)}"
        except openai.APIConnectionError:
            turn.error = f"The server at {base_url} cannot be reached. Is it running?"
        history = history + messages[sent - 1 :]  # the question, and any tool calls with their results
        if turn.error is None:  # reasoning is never sent back in later turns
            history.append({"role": "assistant", "content": turn.answer})
        yield display + turn.messages(), history, turn.stats(), ""

    with gr.Blocks(title=title, analytics_enabled=False) as demo:  # no calls home from the server
        gr.Markdown(f"### {title}")
        chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat")
        history = gr.State([])
        with gr.Row():
            textbox = gr.Textbox(
                placeholder="Ask something, e.g. What is 4721-385?",
                label="Message",
                show_label=False,
                scale=6,
                elem_id="message",
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        stats = gr.Markdown(elem_id="stats")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True)
            system = gr.Textbox(label="System prompt", value="")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature")
                top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="top_p")
                max_tokens_slider = gr.Slider(
                    1, 8192, value=max_tokens, step=1, label="max_tokens", elem_id="max_tokens"
                )
            with gr.Row():
                thinking = gr.Checkbox(value=True, label="enable_thinking")
                budget = gr.Slider(0, 2048, value=0, step=1, label="reasoning budget (0: none)")
        inputs = [
            textbox,
            history,
            chatbot,
            model,
            system,
            temperature,
            top_p,
            max_tokens_slider,
            thinking,
            budget,
        ]
        outputs = [chatbot, history, stats, textbox]
        private = {"api_visibility": "private"}
        # several people may chat at once (Gradio's default is one at a time per event)
        sent = send.click(respond, inputs, outputs, api_name="chat", concurrency_limit=concurrency)
        submitted = textbox.submit(respond, inputs, outputs, concurrency_limit=concurrency, **private)
        stop.click(None, None, None, cancels=[sent, submitted], **private)
        clear.click(lambda: ([], [], ""), None, [chatbot, history, stats], **private)
        demo.load(list_models, None, model, **private)
    return demo


class Round:
    """One request of a turn and its streamed reply: reasoning, answer, tool calls and their results."""

    def __init__(self):
        self.reasoning, self.answer = "", ""
        self.calls: dict[int, dict] = {}  # by index: id, name, arguments (as the stream sent them)
        self.results: list[str] = []  # what the playground's tools returned, one per call
        self.usage = None
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.end: float | None = None

    def add(self, chunk) -> None:
        if chunk.usage is not None:
            self.usage, self.end = chunk.usage, time.perf_counter()
        if not chunk.choices:
            return
        delta = chunk.choices[0].delta
        self.reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        self.answer += delta.content or ""
        for entry in delta.tool_calls or []:
            call = self.calls.setdefault(entry.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or entry.id
            if entry.function is not None:
                call["name"] += entry.function.name or ""
                call["arguments"] += entry.function.arguments or ""
        if self.first_token_at is None and (self.reasoning or self.answer or self.calls):
            self.first_token_at = time.perf_counter()

    def tool_calls(self) -> list[dict]:
        """The calls as an assistant message carries them back to the server."""
        return [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(self.calls.items())
        ]

    def messages(self, done: bool) -> list[gr.ChatMessage]:
        """Thinking, each tool call and its result, and the answer: each its own block."""
        shown = []
        if self.reasoning:
            status = "done" if done or self.answer or self.calls else "pending"
            shown.append(_block(self.reasoning, THINKING_TITLE, status))
        for k, (_, call) in enumerate(sorted(self.calls.items())):
            title = _title(TOOL_CALL_TITLE, call["name"], call["arguments"])
            shown.append(_block(f"```json\n{call['arguments']}\n```", title))
            if k < len(self.results):
                shown.append(
                    _block(
                        f"```json\n{self.results[k]}\n```",
                        _title(TOOL_RESULT_TITLE, call["name"], self.results[k]),
                    )
                )
        if self.answer:
            shown.append(gr.ChatMessage(role="assistant", content=self.answer))
        return shown


def _title(kind: str, name: str, detail: str, width: int = 60) -> str:
    """`Tool call: multiply · {"a": 37, "b": 91}`: what a collapsed block shows."""
    detail = " ".join(detail.split())
    return f"{kind}: {name} · {detail if len(detail) <= width else detail[: width - 1] + '…'}"


def _block(content: str, title: str, status: str = "done") -> gr.ChatMessage:
    return gr.ChatMessage(role="assistant", content=content, metadata={"title": title, "status": status})


class Turn:
    """One question and its reply: one round per request (more when the playground ran tools)."""

    def __init__(self, question: str):
        self.question = question
        self.rounds = [Round()]
        self.error: str | None = None

    @property
    def last(self) -> Round:
        return self.rounds[-1]

    def add(self, chunk) -> None:
        self.last.add(chunk)

    def run_tools(self, run_tool) -> list[dict]:
        """Runs the last round's calls and opens the next round; returns the messages that carry the
        calls and their results back to the server."""
        calls = self.last.tool_calls()
        self.last.results = [run_tool(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        results = [
            {"role": "tool", "tool_call_id": c["id"], "content": r}
            for c, r in zip(calls, self.last.results, strict=True)
        ]
        self.rounds.append(Round())
        return [{"role": "assistant", "content": None, "tool_calls": calls}, *results]

    @property
    def answer(self) -> str:
        return self.last.answer

    def messages(self) -> list[gr.ChatMessage]:
        shown = [gr.ChatMessage(role="user", content=self.question)]
        finished = self.last.end is not None or self.error is not None
        for k, round_ in enumerate(self.rounds):
            shown += round_.messages(done=finished or k < len(self.rounds) - 1)
        if not self.last.answer and not self.last.calls and self.error is None:
            shown.append(gr.ChatMessage(role="assistant", content=""))
        if self.error is not None:
            shown.append(gr.ChatMessage(role="assistant", content=f"⚠️ {self.error}"))
        return shown

    def stats(self) -> str:
        """The last request's usage and speed, and the time to the turn's first token."""
        first, last = self.rounds[0], self.last
        if last.usage is None or first.first_token_at is None or last.first_token_at is None:
            return ""
        ttft = first.first_token_at - first.start
        decode_s = max((last.end or time.perf_counter()) - last.first_token_at, 1e-6)
        speed = max(last.usage.completion_tokens - 1, 0) / decode_s
        rounds = f" · {len(self.rounds)} requests (tools ran in between)" if len(self.rounds) > 1 else ""
        return (
            f"prompt {last.usage.prompt_tokens} tokens · completion {last.usage.completion_tokens} tokens · "
            f"time to first token {ttft * 1000:.0f} ms · {speed:.1f} tokens/s{rounds}"
        )


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str((body.get("error") or body).get("message") or exc.message)

"""The Gradio playground: a streaming chat that shows the model's reasoning apart from its answer.

It talks to an OpenAI-compatible server only (fdkit's own, or FastDeploy, vLLM), so it has no templating
or sampling logic of its own: `build_playground(base_url=...)` returns the Blocks to mount or launch.
"""

from __future__ import annotations

import time

import gradio as gr
import openai

THINKING_TITLE = "Thinking"


def build_playground(
    base_url: str,
    api_key: str = "null",
    title: str = "fdkit playground",
    concurrency: int = 16,
    max_tokens: int = 512,
) -> gr.Blocks:
    """`max_tokens` is the slider's starting value; `concurrency` how many chats may run at once."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)

    async def list_models():
        try:
            names = [m.id async for m in client.models.list()]
        except openai.OpenAIError:
            names = []
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    async def respond(
        message, history, display, model, system, temperature, top_p, max_tokens, thinking, budget
    ):
        if not message.strip():
            yield display, history, "", message
            return
        turn = Turn(message)
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + history
        messages.append({"role": "user", "content": message})
        extra = {"chat_template_kwargs": {"enable_thinking": bool(thinking)}}
        if thinking and budget:
            extra["reasoning_max_tokens"] = int(budget)
        stream = None
        try:
            stream = await client.chat.completions.create(
                model=model or "default",
                messages=messages,
                stream=True,
                temperature=temperature,
                top_p=top_p,
                max_tokens=int(max_tokens),
                stream_options={"include_usage": True},
                extra_body=extra,
            )
            async for chunk in stream:
                turn.add(chunk)
                yield display + turn.messages(), history, turn.stats(), ""
        except openai.APIStatusError as exc:
            turn.error = f"The server refused the request ({exc.status_code}): {_error_message(exc)}"
        except openai.APIConnectionError:
            turn.error = f"The server at {base_url} cannot be reached. Is it running?"
        finally:
            if stream is not None:
                await stream.close()  # a stopped turn ends the request, so the engine frees its blocks
        history = history + [{"role": "user", "content": message}]
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


class Turn:
    """One question and its streamed reply: reasoning, answer, usage and timing."""

    def __init__(self, question: str):
        self.question = question
        self.reasoning, self.answer = "", ""
        self.usage = None
        self.error: str | None = None
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.end: float | None = None

    def add(self, chunk) -> None:
        if chunk.usage is not None:
            self.usage, self.end = chunk.usage, time.perf_counter()
        if not chunk.choices:
            return
        delta = chunk.choices[0].delta
        reasoning = (delta.model_extra or {}).get("reasoning_content") or ""
        if (reasoning or delta.content) and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.reasoning += reasoning
        self.answer += delta.content or ""

    def messages(self) -> list[gr.ChatMessage]:
        shown = [gr.ChatMessage(role="user", content=self.question)]
        if self.reasoning:
            done = bool(self.answer) or self.end is not None or self.error is not None
            shown.append(
                gr.ChatMessage(
                    role="assistant",
                    content=self.reasoning,
                    metadata={"title": THINKING_TITLE, "status": "done" if done else "pending"},
                )
            )
        if self.answer or self.error is None:
            shown.append(gr.ChatMessage(role="assistant", content=self.answer))
        if self.error is not None:
            shown.append(gr.ChatMessage(role="assistant", content=f"⚠️ {self.error}"))
        return shown

    def stats(self) -> str:
        if self.usage is None or self.first_token_at is None:
            return ""
        ttft = self.first_token_at - self.start
        decode_s = max((self.end or time.perf_counter()) - self.first_token_at, 1e-6)
        speed = max(self.usage.completion_tokens - 1, 0) / decode_s
        return (
            f"prompt {self.usage.prompt_tokens} tokens · completion {self.usage.completion_tokens} tokens · "
            f"time to first token {ttft * 1000:.0f} ms · {speed:.1f} tokens/s"
        )


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str((body.get("error") or body).get("message") or exc.message)

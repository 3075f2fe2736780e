"""Drives a Tandem server with the official OpenAI Python client (a client this project did not
write). Run by tests/frontend_openai.rs: `python openai_client.py BASE_URL MODEL`.

Checks what the client itself can see (types parse, streams end, usage adds up, errors raise the
right exception) and prints one JSON line with results the Rust side compares further.
"""

import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
out = {}

# Chat, whole.
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
)
choice = chat.choices[0]
assert chat.object == "chat.completion", chat
assert choice.message.role == "assistant"
assert isinstance(choice.message.content, str)
assert choice.finish_reason in ("stop", "length"), choice
assert 1 <= chat.usage.completion_tokens <= 8, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
out["chat_text"] = choice.message.content
out["chat_usage"] = [chat.usage.prompt_tokens, chat.usage.completion_tokens]

# Chat, streamed, with usage: the same greedy text.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    assert chunk.object == "chat.completion.chunk"
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert usage is not None, "include_usage gave no usage chunk"
assert finish in ("stop", "length")
assert "".join(pieces) == out["chat_text"], (pieces, out["chat_text"])
assert [usage.prompt_tokens, usage.completion_tokens] == out["chat_usage"], usage

# Completions: text prompt, token-id prompt, several prompts.
cmpl = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
assert cmpl.object == "text_completion"
assert len(cmpl.choices) == 1 and isinstance(cmpl.choices[0].text, str)
out["completion_text"] = cmpl.choices[0].text

ids = [1, 45, 74, 31, 34, 33]
by_ids = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
assert by_ids.usage.prompt_tokens == len(ids), by_ids.usage
assert by_ids.usage.completion_tokens == 12
# `token_ids` is our (and vLLM's) extra field; the client keeps unknown fields.
out["ids_completion_token_ids"] = (by_ids.choices[0].model_extra or {}).get("token_ids")
assert out["ids_completion_token_ids"] is not None and len(out["ids_completion_token_ids"]) == 12

many = client.completions.create(model=model, prompt=["a b", "c d"], max_tokens=3, temperature=0)
assert sorted(c.index for c in many.choices) == [0, 1]

# Completions streamed: same text as whole.
text = ""
for chunk in client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                       temperature=0, stream=True):
    for c in chunk.choices:
        text += c.text
assert text == out["completion_text"], (text, out["completion_text"])

# The guide's benchmark request shape: nvext + vLLM extras force the output length.
forced = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hi"}],
    max_tokens=10,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"min_tokens": 10, "ignore_eos": True, "nvext": {"ignore_eos": True}},
)
forced_usage = [c.usage for c in forced if c.usage is not None]
assert forced_usage and forced_usage[-1].completion_tokens == 10, forced_usage

# Errors raise the client's typed exceptions.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.completions.create(model=model, prompt=[1] * 10, max_tokens=10**6)
    raise AssertionError("over-long request accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "max" in str(e).lower()

models = client.models.list()
assert [m.id for m in models.data] == [model], models

print(json.dumps(out))

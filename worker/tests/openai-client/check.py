"""The OpenAI Python client against `moe-worker serve`: run by
worker/tests/serve_openai_client.rs with the server's base URL and model
name. Exits non-zero (with the reason) when the client cannot use the
server as it uses OpenAI's."""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert model in models, f"/v1/models lists {models}"

completion = client.completions.create(model=model, prompt="the cat ", max_tokens=8, temperature=0)
text = completion.choices[0].text
assert text and completion.usage.completion_tokens > 0, completion

messages = [{"role": "user", "content": "the dog"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
reply = chat.choices[0].message.content
assert reply and chat.choices[0].message.role == "assistant", chat

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, stream=True
)
streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
assert streamed == reply, f"streamed {streamed!r}, whole {reply!r}"

# Log-probabilities in both shapes, parsed into the client's own types.
scored = client.completions.create(
    model=model, prompt="the cat ", max_tokens=8, temperature=0, logprobs=2
)
logprobs = scored.choices[0].logprobs
assert scored.choices[0].text == text, scored
assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs) > 0, logprobs
assert all(lp <= 0 for lp in logprobs.token_logprobs), logprobs
scored_chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
)
content = scored_chat.choices[0].logprobs.content
assert content and all(len(entry.top_logprobs) == 2 for entry in content), content
# Greedy: the chosen token is the likeliest at its position.
assert all(entry.top_logprobs[0].logprob == entry.logprob for entry in content), content

# The usage after a stream, when asked for.
chunks = list(
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, chunks[-1]

# Several choices (`n`), seeded: each its own sample, the prompt's usage
# counted once, the cached tokens in the client's usage type (none: the
# prompt is shorter than one KV page, and only whole pages are reused).
several = client.completions.create(
    model=model, prompt="the cat ", max_tokens=8, temperature=1.0, seed=3, n=3
)
assert [c.index for c in several.choices] == [0, 1, 2], several
assert several.usage.prompt_tokens == completion.usage.prompt_tokens, several
assert several.usage.prompt_tokens_details.cached_tokens == 0, several
streamed_choices = ["", ""]
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, n=2, stream=True
):
    for choice in chunk.choices:
        streamed_choices[choice.index] += choice.delta.content or ""
assert streamed_choices == [reply, reply], f"greedy choices {streamed_choices!r}, whole {reply!r}"

# Scoring prompts as evaluation harnesses do: a batch of token-id prompts,
# echo with logprobs and max_tokens 0 — the prompts' own log-probabilities,
# the first token's null, in the client's types.
prompts = [[116, 104, 101, 32, 99, 97, 116], [97, 32, 100, 111, 103]]
judged = client.completions.create(
    model=model, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0
)
assert [c.index for c in judged.choices] == [0, 1], judged
for choice, ids in zip(judged.choices, prompts):
    assert choice.text == bytes(ids).decode(), choice
    values = choice.logprobs.token_logprobs
    assert len(values) == len(ids) and values[0] is None, choice
    assert all(v <= 0 for v in values[1:]), choice
assert judged.usage.completion_tokens == 0, judged
assert judged.usage.prompt_tokens == sum(map(len, prompts)), judged

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as error:
    assert error.status_code == 404, error

print(f"completion {text!r}; chat {reply!r} (streamed the same)")

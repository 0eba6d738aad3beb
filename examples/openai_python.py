"""Use tiergate from the official OpenAI Python SDK: only `base_url` changes.

    python examples/openai_python.py

Environment: TIERGATE_BASE_URL (default http://127.0.0.1:8080/v1), OPENAI_API_KEY (a gateway
key from `tiergate keys create`, not a provider key; any value with `[auth] enabled = false`),
TIERGATE_MODEL (default `tiergate-auto`, routed by the policy).
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("TIERGATE_BASE_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "not-needed-locally"),
)
model = os.environ.get("TIERGATE_MODEL", "tiergate-auto")
question = [{"role": "user", "content": "What is the capital of France?"}]

# Non-streaming; with_raw_response exposes tiergate's routing headers.
raw = client.chat.completions.with_raw_response.create(model=model, messages=question)
completion = raw.parse()
print("tier:", raw.headers.get("x-tiergate-tier"), "rule:", raw.headers.get("x-tiergate-rule"),
      "score:", raw.headers.get("x-tiergate-score"))
print("answer:", completion.choices[0].message.content)
print("usage:", completion.usage.prompt_tokens, completion.usage.completion_tokens)

# Streaming, with usage reported in the last chunk.
stream = client.chat.completions.create(
    model=model, messages=question, stream=True, stream_options={"include_usage": True}
)
parts = []
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        print("stream usage:", chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
print("streamed:", "".join(parts))

"""The official OpenAI Python SDK against kcp (driven by tests/providers_python_sdk.rs).

For each model named on the command line: one chat completion, then the same streamed; then
the model list. Prints one JSON object with what the SDK parsed.
"""

import json
import os
import sys

from openai import OpenAI

client = OpenAI(
    base_url=os.environ["KCP_BASE_URL"],
    api_key=os.environ["KCP_CLIENT_TOKEN"],
    max_retries=0,
    timeout=20.0,
)
messages = [{"role": "user", "content": "Say hello."}]
result = {"chat": {}, "stream": {}, "models": []}
for model in sys.argv[1:]:
    reply = client.chat.completions.create(model=model, messages=messages)
    result["chat"][model] = {
        "model": reply.model,
        "content": reply.choices[0].message.content,
        "finish_reason": reply.choices[0].finish_reason,
    }
    chunks = client.chat.completions.create(model=model, messages=messages, stream=True)
    result["stream"][model] = "".join(
        chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices
    )
result["models"] = [model.id for model in client.models.list()]
print(json.dumps(result))

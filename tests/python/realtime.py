"""The official OpenAI Python SDK's Realtime client against kcp (driven by
tests/providers_realtime.rs, whose upstream greets with `session.created` and echoes frames).

Opens a session for the model named on the command line, reads the first server event,
sends a client event and reads its echo. Prints one JSON object with what it saw.
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
result = {}
with client.realtime.connect(model=sys.argv[1], max_retries=0) as connection:
    result["first"] = connection.recv().type
    connection.send({"type": "response.create"})
    result["echo"] = json.loads(connection.recv_bytes())
print(json.dumps(result))

"""The client protocols besides Chat Completions (docs/reference.md §14): one translator each.

A translator is pure code: it turns a request in its protocol into a Chat Completions
request, and a chat answer (whole, or as a stream of chunks) back into its protocol's
answer or events, event for event, with usage. The gateway sends a request as it is to a
provider that speaks its protocol natively, and through its translator otherwise.

    messages.py          Anthropic Messages: request, answer, errors
    messages_stream.py   a chat stream as Anthropic's events
    responses.py         OpenAI Responses: request, answer, errors
    responses_stream.py  a chat stream as Responses events
    chunks.py            reading a chat stream's server-sent events, whole, as they arrive
    usage.py             usage between the protocols' shapes
    ids.py               response ids that carry their provider, under a MAC

Legacy completions have no translator: docs/reference.md §14 sends them only to providers that speak them.
What has no Chat Completions counterpart (hosted tools, `thinking`, `cache_control`,
`include`...) is dropped, never refused, so real clients keep working. Nothing here chooses a
host or a credential: a translated request carries only chat fields.
"""

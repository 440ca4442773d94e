"""The person's memory: what they wrote, searchable at serve time, and what they taught their doppel.

- `doppel.memory.index`: a BM25 index over the person's own messages (with the message each answered,
  channel, timestamp and permalink), built with the adapter and written beside it, searched per reply
  under a token budget; a low score means the messages do not cover the question (abstention).
- `doppel.memory.voice`: the abstention reply, in the person's habits of writing.
- `doppel.memory.feedback`: per-doppel feedback (👍/👎) and the person's corrections, kept in the
  doppel's own data directory, read by the next training.

Used by train and serve; imports neither (nor Slack, kopf or Bolt).
"""

"""A synthetic Slack workspace (export shape, for `SlackEmulator.add_team`): channels of threads, any size.

`user0` asks a question in each thread and `user1` answers it; every answer is long enough to be a sample.
"""

from __future__ import annotations

from typing import Any


def synthetic_workspace(
    now: float, channels: int, threads: int, replies: int = 2, *, days: float = 30, team: str = "TBENCH"
) -> dict[str, Any]:
    users = [
        {"id": f"U{i:03d}", "team_id": team, "name": f"user{i}", "profile": {"display_name": f"user{i}"}}
        for i in range(5)
    ]
    listed, messages = [], {}
    start = int(now - days * 86400)
    spacing = max(1, int(days * 86400 / max(1, channels * threads)) // 2)
    for c in range(channels):
        name = f"channel-{c:02d}"
        listed.append({"id": f"C{c:03d}", "name": name, "members": []})
        msgs = []
        for t in range(threads):
            base = start + (c * threads + t) * spacing
            root = f"{base}.000100"
            msgs.append({"type": "message", "ts": root, "user": "U001", "text": f"question {t} in {name}?"})
            for r in range(replies):
                msgs.append(
                    {
                        "type": "message",
                        "ts": f"{base + r + 1}.000200",
                        "thread_ts": root,
                        "user": "U000" if r == 0 else "U002",
                        "text": f"An answer to question {t} in <#C{c:03d}|{name}>, " + "long enough " * 10,
                    }
                )
        messages[name] = msgs
    return {"team": {"id": team, "name": "Bench"}, "users": users, "channels": listed, "messages": messages}

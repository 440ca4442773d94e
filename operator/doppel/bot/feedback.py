"""Under a doppel's reply: its sources, feedback buttons, and "Correct this" for the cloned person.

- Sources: a context block, "from #channel, 12 Mar" per retrieved message, linked to it (Slack's way of
  citing, as its AI apps do).
- Feedback: Slack's `feedback_buttons` element in a `context_actions` block (the Block Kit convention for
  AI apps' replies); a click stores one 👍 or 👎 per person and reply (`doppel.memory.feedback`).
- "Correct this": a button anyone sees but only the cloned person may use (others are told so, privately);
  it opens a modal with the reply prefilled, and what they submit is stored as their correction, which
  the next training learns from (a weighted sample and a preference pair).
Button values carry the doppel's object name; the workspace comes from the verified request, so a click
can only ever touch a doppel of the workspace it comes from.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext

from doppel.bot import logic
from doppel.bot.access import admitted, tenant_of
from doppel.bot.deps import Deps
from doppel.memory.feedback import FeedbackStore
from doppel.memory.index import Entry

LOG = logging.getLogger(__name__)
FEEDBACK_ACTION = "doppel_feedback"
CORRECT_ACTION = "doppel_correct"
CORRECTION_VIEW = "doppel_correction"
CORRECTION_BLOCK, CORRECTION_INPUT = "correction", "text"
MAX_SOURCES = 5


def sources_block(sources: Sequence[dict[str, Any]], days: Sequence[str]) -> dict[str, Any]:
    """The context block citing the retrieved messages: "from #channel, 12 Mar", linked when it can be."""
    cited = []
    for source, day in list(zip(sources, days, strict=True))[:MAX_SOURCES]:
        label = f"#{source['channel']}, {day}"
        cited.append(f"<{source['permalink']}|{label}>" if source.get("permalink") else label)
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": "from " + " · ".join(cited)}]}


def reply_blocks(
    text: str, doppel_name: str, *, sources: Sequence[dict[str, Any]] = (), days: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The last message of a reply: its text, its sources, feedback and correction buttons."""
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if sources:
        blocks.append(sources_block(sources, days))
    blocks.append(
        {
            "type": "context_actions",
            "elements": [
                {
                    "type": "feedback_buttons",
                    "action_id": FEEDBACK_ACTION,
                    "positive_button": {
                        "text": {"type": "plain_text", "text": "👍"},
                        "accessibility_label": "This sounds like them",
                        "value": f"up|{doppel_name}",
                    },
                    "negative_button": {
                        "text": {"type": "plain_text", "text": "👎"},
                        "accessibility_label": "This does not sound like them",
                        "value": f"down|{doppel_name}",
                    },
                }
            ],
        }
    )
    blocks.append(
        {
            "type": "actions",
            "elements": [
                {
                    "type": "button",
                    "action_id": CORRECT_ACTION,
                    "text": {"type": "plain_text", "text": "Correct this"},
                    "value": doppel_name,
                }
            ],
        }
    )
    return blocks


def source_days(sources: Sequence[dict[str, Any]]) -> list[str]:
    return [Entry(s["text"], s["channel"], "", s["ts"], s["ts"]).day() for s in sources]


async def status_line(deps: Deps, namespace: str, doppel: dict[str, Any]) -> str:
    """What `/doppel status` adds once the doppel has answered: the feedback and corrections the next
    training will use."""
    store = deps.memories.store(namespace, doppel)
    if store is None:
        return ""
    counts = await asyncio.to_thread(store.counts)
    if not (counts.replies or counts.up or counts.down or counts.corrections):
        return ""  # nothing answered yet: nothing to say
    return (
        f"\nFeedback: {counts.up} 👍, {counts.down} 👎, {counts.corrections} correction"
        f"{'' if counts.corrections == 1 else 's'} on {counts.replies} replies (the next training uses them)."
    )


async def _doppel_of(
    deps: Deps, context: AsyncBoltContext, body: dict[str, Any], name: str
) -> tuple[dict[str, Any], FeedbackStore] | None:
    """The clicked doppel of the request's own workspace, with its feedback store; None if it has none."""
    tenant = tenant_of(context, body)
    namespace = deps.config.namespace_for(tenant.team_id)
    doppel = await deps.kube.get_doppel(namespace, tenant.team_id, name)
    store = deps.memories.store(namespace, doppel) if doppel else None
    if doppel is None or store is None:
        return None
    return doppel, store


def _reply_ts(body: dict[str, Any]) -> str:
    return str((body.get("container") or {}).get("message_ts") or (body.get("message") or {}).get("ts"))


async def on_feedback(
    deps: Deps, context: AsyncBoltContext, body: dict[str, Any], action: dict[str, Any]
) -> None:
    """👍 or 👎 on a reply, from a member of the workspace."""
    vote, _, name = str(action.get("value") or "").partition("|")
    user = body["user"]["id"]
    if vote not in ("up", "down") or not await admitted(
        deps, context.client, tenant_of(context, body), body, user
    ):
        return
    found = await _doppel_of(deps, context, body, name)
    if found is not None:
        await asyncio.to_thread(found[1].vote, _reply_ts(body), user, vote)  # type: ignore[arg-type]


async def on_correct(
    deps: Deps, context: AsyncBoltContext, body: dict[str, Any], action: dict[str, Any]
) -> None:
    """ "Correct this": the modal for the cloned person, a private no for anyone else."""
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id") or ""
    found = await _doppel_of(deps, context, body, str(action.get("value") or ""))
    if found is None:
        return
    doppel, store = found
    if user != logic.target_of(doppel):
        handle = logic.handle_of(doppel)
        await context.client.chat_postEphemeral(
            channel=channel, user=user, text=f"Only {handle} can correct their doppel's replies."
        )
        return
    reply_ts = _reply_ts(body)
    record = await asyncio.to_thread(store.reply, reply_ts)
    reply = record["reply"] if record else (body.get("message") or {}).get("text", "")
    metadata = {"doppel": doppel["metadata"]["name"], "reply_ts": reply_ts}
    await context.client.views_open(
        trigger_id=body["trigger_id"],
        view={
            "type": "modal",
            "callback_id": CORRECTION_VIEW,
            "private_metadata": json.dumps(metadata, separators=(",", ":")),
            "title": {"type": "plain_text", "text": "Correct this"},
            "submit": {"type": "plain_text", "text": "Save"},
            "close": {"type": "plain_text", "text": "Cancel"},
            "blocks": [
                {
                    "type": "input",
                    "block_id": CORRECTION_BLOCK,
                    "label": {"type": "plain_text", "text": "What would you have said?"},
                    "element": {
                        "type": "plain_text_input",
                        "action_id": CORRECTION_INPUT,
                        "multiline": True,
                        "initial_value": reply[:3000],
                    },
                }
            ],
        },
    )


async def on_correction(
    deps: Deps, context: AsyncBoltContext, body: dict[str, Any], view: dict[str, Any]
) -> dict[str, Any] | None:
    """The modal submitted: stored as the person's correction, checked again (the person, this workspace).
    Returns the acknowledgement's `response_action` errors, if any."""
    metadata = json.loads(view.get("private_metadata") or "{}")
    value = view["state"]["values"][CORRECTION_BLOCK][CORRECTION_INPUT].get("value") or ""
    if not value.strip():
        return {"response_action": "errors", "errors": {CORRECTION_BLOCK: "Write what you would have said."}}
    found = await _doppel_of(deps, context, body, str(metadata.get("doppel") or ""))
    if found is None or body["user"]["id"] != logic.target_of(found[0]):
        LOG.warning("correction by %s refused", body["user"]["id"])
        return None
    await asyncio.to_thread(found[1].correct, str(metadata["reply_ts"]), body["user"]["id"], value.strip())
    return None

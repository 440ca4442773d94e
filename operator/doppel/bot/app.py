"""The Bolt app: its listeners wired to the bot's paths, nothing more. Mentions are answered by
`doppel.bot.mentions`, the `/doppel` command by `doppel.bot.commands`, consent buttons by
`doppel.bot.consent`, uninstalls and token revocations by `doppel.bot.revocation`; in single-workspace
mode a middleware refuses requests of any other workspace.

The server (`doppel.bot.server`) acknowledges an event as soon as its signature is checked and hands it to
Bolt on the `Worker` (its own thread and event loop), where the listener's answer runs too: Slack gets its
acknowledgement within 3 seconds whatever the model, the Slack API or Kubernetes do, even in a burst.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt import BoltResponse
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization.async_authorize import AsyncAuthorize
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.web.async_client import AsyncWebClient

from doppel.bot import commands, consent, feedback, mentions, revocation
from doppel.bot.access import claimed_teams
from doppel.bot.chat import backend_chat
from doppel.bot.deps import Deps

# Re-exported: `doppel.local` imports `backend_chat` from here.
__all__ = ["backend_chat", "build_app"]

LOG = logging.getLogger(__name__)


def build_app(
    deps: Deps,
    *,
    client: AsyncWebClient,
    oauth_flow: AsyncOAuthFlow | None = None,
    authorize: AsyncAuthorize | None = None,
    installation_store: AsyncInstallationStore | None = None,
) -> AsyncApp:
    """The Bolt app. `client` carries the Slack API base URL and, in single-workspace mode, the bot token;
    `oauth_flow` selects multi-workspace mode."""
    app = AsyncApp(
        signing_secret=deps.config.signing_secret,
        client=client,
        oauth_flow=oauth_flow,
        authorize=authorize,
        logger=LOG,
    )

    if oauth_flow is None:

        @app.middleware
        async def same_workspace(
            context: AsyncBoltContext, body: dict[str, Any], next: Callable[[], Awaitable[Any]]
        ) -> Any:
            """One bot token serves one workspace: a request naming another one anywhere (an org-wide
            envelope's `authorizations[0].team_id` is null, so every place counts) is refused."""
            owner = context.authorize_result.team_id if context.authorize_result else None
            others = claimed_teams(context, body) - {owner}
            if owner and (others or context.is_enterprise_install):
                LOG.warning("request of team %s refused: this bot serves team %s", others, owner)
                # 200, not 403: Slack retries errors, and a refusal is an answer.
                return BoltResponse(status=200, body="This app serves another workspace.")
            return await next()

    @app.event("app_mention")
    async def on_mention(body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
        mentions.on_mention(deps, body, event, context)

    @app.event("tokens_revoked")
    @app.event("app_uninstalled")
    async def on_revoked(body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
        await revocation.on_revoked(deps, installation_store, body, event, context)

    @app.event("message")
    async def on_message() -> None:
        """Plain messages (edits, `message_changed`, bots' posts) are not for the bot: mentions come as
        `app_mention`. Acknowledging them keeps Bolt quiet."""

    @app.command("/doppel")
    async def on_command(ack: Any, respond: Any, command: dict[str, Any], context: AsyncBoltContext) -> None:
        await commands.on_command(deps, ack, respond, command, context)

    @app.action(consent.CONSENT_ACTION)
    async def on_consent(
        ack: Any, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        await ack()
        deps.worker.submit(consent.answer_consent(deps, context, body, action), "consent answer")

    @app.action(feedback.FEEDBACK_ACTION)
    async def on_feedback(
        ack: Any, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        await ack()
        deps.worker.submit(feedback.on_feedback(deps, context, body, action), "feedback")

    @app.action(feedback.CORRECT_ACTION)
    async def on_correct(
        ack: Any, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        await ack()
        await feedback.on_correct(deps, context, body, action)  # now: the modal's trigger_id lasts 3 s

    @app.view(feedback.CORRECTION_VIEW)
    async def on_correction(
        ack: Any, body: dict[str, Any], view: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        errors = await feedback.on_correction(deps, context, body, view)
        await ack(**errors) if errors else await ack()

    return app

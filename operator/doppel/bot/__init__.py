"""Slack Bolt app: mentions, the /doppel command, OAuth and the installation store."""

"""Slack Web API scraping, Slack export import, text normalisation and sample building."""

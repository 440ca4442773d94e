"""doppel: clone a colleague into a Slack bot, run on Kubernetes."""

__version__ = "0.1.0"

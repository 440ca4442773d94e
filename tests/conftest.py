"""Fixtures shared by the whole suite live in tests/support/, one module per area."""

pytest_plugins = [
    "tests.support.slack_fixtures",
    "tests.support.model_fixtures",
    "tests.support.vllm_fixtures",
    "tests.support.kube_fixtures",
    "tests.support.bot_fixtures",
    "tests.support.postgres_fixtures",
]

"""The bot's configuration, read from the environment (the Helm chart and `doppel bot` set it)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from doppel.errors import BadInput
from doppel.memory.prompt import MemorySettings
from doppel.metrics import port_from_env
from doppel.serve.backend import DEFAULT_PARAMS, OPENING_TEMPERATURE, GenerationParams
from doppel.slack.ratelimit import PROFILES as RATE_PROFILES
from doppel.slack.scrub import phone_regions

# DOPPEL_INSTALL_ALLOWLIST's value for an app distributed publicly: any workspace may install it.
ANY_WORKSPACE = "any"

# The bot scopes, in one place: OAuth installs ask for exactly these, and a test holds the app manifest
# (charts/doppel/examples/slack-app-manifest.yaml) and the README to them.
DEFAULT_SCOPES = (
    "app_mentions:read",  # mentions
    "channels:history",  # threads of public channels (the prompt), and the scrape
    "channels:join",  # the scrape joins the public channels it reads
    "channels:read",
    "groups:history",  # the same for private channels the bot was invited to
    "groups:read",
    "chat:write",
    "chat:write.customize",  # replies under the doppel's name and icon
    "commands",  # /doppel
    "im:write",  # consent requests and progress notices, in direct messages (conversations.open)
    "users:read",
)


@dataclass(frozen=True)
class BotConfig:
    """Everything the bot needs to know; see the README's `bot` section for the variables."""

    signing_secret: str
    # Single-workspace mode: one bot token. Multi-workspace (OAuth) mode: client id and secret instead.
    bot_token: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    app_token: str | None = None  # Socket Mode
    slack_api_url: str | None = None  # e.g. the test emulator; None means slack.com
    vllm_url: str = "http://127.0.0.1:8000"
    vllm_timeout_s: float = 60.0
    max_tokens: int = 512  # per reply; prompt + reply must fit the server's --max-model-len
    # The temperature of a reply's first token (GenerationParams.opening_temperature); 0: as the rest.
    opening_temperature: float = OPENING_TEMPERATURE
    # Where each workspace's doppels live: explicit TEAM=namespace pairs, else the template.
    team_namespaces: Mapping[str, str] = field(default_factory=dict)
    namespace_template: str = "doppel-{team}"
    # Namespaces whose DoppelUsers the progress notifier lists and watches (the chart: its own, so the bot
    # needs no cluster-wide permission); empty: every namespace.
    watch_namespaces: tuple[str, ...] = ()
    # The bot's own namespace: installation Secrets and the seen-event ledger.
    bot_namespace: str = "doppel"
    require_consent: bool = True
    max_doppels_per_workspace: int = 10
    database_url: str | None = None  # slack_sdk's SQLAlchemy stores and the event ledger, if set
    event_ttl_s: int = 3600
    oauth_redirect_uri: str | None = None
    poll_interval_s: float = 60.0  # progress: a full pass this often, besides the watch's wake-ups
    sweep_interval_s: float = 300.0  # expired event claims are deleted this often
    # What `/doppel train` puts in a new DoppelUser: the shared base model and the token Secret's name.
    base_model_name: str = "base"
    base_model_path: str = "/models/base"
    token_secret: str = "slack-bot-token"
    # `spec.slack.rateProfile` of those DoppelUsers (DOPPEL_RATE_PROFILE); `new_doppel_rate_profile` if None.
    rate_profile: str | None = None
    # A mention that finds no vLLM pod ready (the pool scaled to zero) is held and answered once one is:
    # the thread is told to expect about `wake_estimate_s` (until a wake-up was measured), and gets an
    # apology instead if none is ready `wake_deadline_s` after the mention (`doppel.bot.coldpool`).
    wake_estimate_s: float = 180.0
    wake_deadline_s: float = 900.0
    wake_poll_s: float = 2.0  # how often held mentions look for a ready pod
    # Prometheus /metrics on this port, apart from the Slack-facing one (0: metrics off).
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"
    # Membership policy (docs/security.md): guests (single- and multi-channel) are refused unless
    # allowed; in channels shared with other organisations (Slack Connect) doppels stay silent unless
    # allowed. People of other organisations never reach a doppel, whatever these say.
    allow_guests: bool = False
    allow_shared_channels: bool = False
    # OAuth installs: the team or Enterprise Grid org ids that may install the app, or ANY_WORKSPACE.
    # Empty: nobody can (the chart asks for a list, or "any", explicitly).
    install_allowlist: frozenset[str] = frozenset()
    # National phone formats the scrubber reads in replies and prompts (ISO 3166; none: US), besides the
    # countries of the people's time zones.
    phone_regions: tuple[str, ...] = ()
    # The shared volume, mounted where the vLLM pods have it: doppels' feedback under
    # DATA_ROOT/NAMESPACE/NAME (None: no feedback buttons). Memory indexes are read beside the adapters.
    data_root: str | None = None
    memory: MemorySettings = field(default_factory=MemorySettings)

    @property
    def oauth(self) -> bool:
        return self.bot_token is None

    def new_doppel_rate_profile(self) -> str | None:
        """The rate profile of DoppelUsers made by `/doppel train`: the configured one; else, installed
        through OAuth (in other workspaces, outside the Marketplace), Slack's non-Marketplace limits; else
        (one workspace's own token: an internal app) the CRD's default."""
        if self.rate_profile:
            return self.rate_profile
        return "non-marketplace" if self.oauth else None

    def may_install(self, team_id: str | None, enterprise_id: str | None) -> bool:
        """Whether an OAuth install of this workspace (or, org-wide, this Grid org) is allowed."""
        allowed = self.install_allowlist
        return ANY_WORKSPACE in allowed or bool({team_id, enterprise_id} & allowed - {None})

    def generation(self) -> GenerationParams:
        """How the bot's replies are generated: the serving defaults, at this reply length and opening."""
        return DEFAULT_PARAMS.override(
            max_tokens=self.max_tokens, opening_temperature=self.opening_temperature
        )

    def namespace_for(self, team_id: str) -> str:
        """The namespace holding `team_id`'s doppels; the team id comes from a verified request."""
        if team_id in self.team_namespaces:
            return self.team_namespaces[team_id]
        return self.namespace_template.format(team=team_id.lower())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotConfig:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        signing_secret = get("SLACK_SIGNING_SECRET")
        if not signing_secret:
            raise BadInput("SLACK_SIGNING_SECRET is not set: every request must be verified")
        bot_token, client_id, client_secret = (
            get("SLACK_BOT_TOKEN"),
            get("SLACK_CLIENT_ID"),
            get("SLACK_CLIENT_SECRET"),
        )
        if not bot_token and not (client_id and client_secret):
            raise BadInput(
                "set SLACK_BOT_TOKEN (one workspace) or SLACK_CLIENT_ID and SLACK_CLIENT_SECRET (OAuth)"
            )
        if bot_token and (client_id or client_secret):
            raise BadInput("set either SLACK_BOT_TOKEN or SLACK_CLIENT_ID/SECRET, not both")
        return cls(
            signing_secret=signing_secret,
            bot_token=bot_token,
            client_id=client_id,
            client_secret=client_secret,
            app_token=get("SLACK_APP_TOKEN"),
            slack_api_url=_slack_api_url(get("SLACK_API_URL")),
            vllm_url=get("VLLM_URL") or cls.vllm_url,
            vllm_timeout_s=_number(get("VLLM_TIMEOUT_S"), "VLLM_TIMEOUT_S", cls.vllm_timeout_s),
            max_tokens=int(_number(get("DOPPEL_MAX_TOKENS"), "DOPPEL_MAX_TOKENS", cls.max_tokens)),
            opening_temperature=_number(
                get("DOPPEL_OPENING_TEMPERATURE"),
                "DOPPEL_OPENING_TEMPERATURE",
                cls.opening_temperature,
                zero_ok=True,
            ),
            team_namespaces=_pairs(get("DOPPEL_TEAM_NAMESPACES")),
            namespace_template=_template(get("DOPPEL_NAMESPACE_TEMPLATE") or cls.namespace_template),
            watch_namespaces=tuple(_names(get("DOPPEL_WATCH_NAMESPACES"), "DOPPEL_WATCH_NAMESPACES")),
            bot_namespace=get("DOPPEL_BOT_NAMESPACE") or cls.bot_namespace,
            require_consent=_flag(get("DOPPEL_REQUIRE_CONSENT"), "DOPPEL_REQUIRE_CONSENT", True),
            max_doppels_per_workspace=int(
                _number(get("DOPPEL_MAX_DOPPELS"), "DOPPEL_MAX_DOPPELS", cls.max_doppels_per_workspace)
            ),
            database_url=get("DOPPEL_DATABASE_URL"),
            oauth_redirect_uri=get("SLACK_REDIRECT_URI"),
            base_model_name=get("DOPPEL_BASE_MODEL") or cls.base_model_name,
            base_model_path=get("DOPPEL_BASE_MODEL_PATH") or cls.base_model_path,
            token_secret=get("DOPPEL_TOKEN_SECRET") or cls.token_secret,
            rate_profile=_rate_profile(get("DOPPEL_RATE_PROFILE")),
            wake_estimate_s=_number(
                get("DOPPEL_WAKE_ESTIMATE_S"), "DOPPEL_WAKE_ESTIMATE_S", cls.wake_estimate_s
            ),
            wake_deadline_s=_number(
                get("DOPPEL_WAKE_DEADLINE_S"), "DOPPEL_WAKE_DEADLINE_S", cls.wake_deadline_s
            ),
            metrics_port=port_from_env(env),
            allow_guests=_flag(get("DOPPEL_ALLOW_GUESTS"), "DOPPEL_ALLOW_GUESTS", False),
            allow_shared_channels=_flag(
                get("DOPPEL_ALLOW_SHARED_CHANNELS"), "DOPPEL_ALLOW_SHARED_CHANNELS", False
            ),
            install_allowlist=_allowlist(get("DOPPEL_INSTALL_ALLOWLIST")),
            phone_regions=_phone_regions(get("DOPPEL_PHONE_REGIONS")),
            data_root=get("DOPPEL_DATA_ROOT"),
            memory=MemorySettings.from_env(env),
        )


def _allowlist(value: str | None) -> frozenset[str]:
    """`T0ACME,E0GRID` or `any`: Slack team or Enterprise ids, or every workspace."""
    items = frozenset(item.strip() for item in (value or "").split(",") if item.strip())
    if ANY_WORKSPACE in items and len(items) > 1:
        raise BadInput(f"DOPPEL_INSTALL_ALLOWLIST is either {ANY_WORKSPACE!r} or a list of ids, not both")
    bad = sorted(i for i in items - {ANY_WORKSPACE} if not re.fullmatch(r"[TE][A-Z0-9]{2,}", i))
    if bad:
        raise BadInput(f"DOPPEL_INSTALL_ALLOWLIST wants Slack team (T…) or org (E…) ids, got {bad[0]!r}")
    return items


def _phone_regions(value: str | None) -> tuple[str, ...]:
    try:
        return phone_regions((value or "").split(","))
    except ValueError as exc:
        raise BadInput(f"DOPPEL_PHONE_REGIONS: {exc}") from None


def _rate_profile(value: str | None) -> str | None:
    if value is not None and value not in RATE_PROFILES:
        raise BadInput(f"DOPPEL_RATE_PROFILE must be one of {', '.join(RATE_PROFILES)}, got {value!r}")
    return value


def _slack_api_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.match(r"^https?://", value):
        raise BadInput(f"SLACK_API_URL must be an http(s) URL, got {value!r}")
    return value.rstrip("/") + "/"


def _number(value: str | None, name: str, default: float, *, zero_ok: bool = False) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise BadInput(f"{name} must be a number, got {value!r}") from None
    if number < 0 or (number == 0 and not zero_ok):
        raise BadInput(f"{name} must be {'0 or more' if zero_ok else 'positive'}, got {value!r}")
    return number


def _flag(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise BadInput(f"{name} must be true or false, got {value!r}")


def _names(value: str | None, variable: str) -> list[str]:
    """`ns-a,ns-b` -> ["ns-a", "ns-b"] (namespace names)."""
    names = [item.strip() for item in (value or "").split(",") if item.strip()]
    for name in names:
        if not _DNS_LABEL.match(name):
            raise BadInput(f"{variable} wants namespace names, got {name!r}")
    return names


def _pairs(value: str | None) -> dict[str, str]:
    """`T1=ns-a,T2=ns-b` -> {"T1": "ns-a", "T2": "ns-b"}."""
    pairs: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        team, sep, namespace = item.partition("=")
        if not sep or not team.strip() or not _DNS_LABEL.match(namespace.strip()):
            raise BadInput(f"DOPPEL_TEAM_NAMESPACES wants TEAM=namespace pairs, got {item.strip()!r}")
        pairs[team.strip()] = namespace.strip()
    return pairs


def _template(value: str) -> str:
    if "{team}" not in value or not _DNS_LABEL.match(value.replace("{team}", "t")):
        raise BadInput(
            f"DOPPEL_NAMESPACE_TEMPLATE must be a namespace name containing {{team}}, got {value!r}"
        )
    return value


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

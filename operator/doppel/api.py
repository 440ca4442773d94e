"""The DoppelUser custom resource: pydantic models of its spec and status (the CRD is generated from them
by `doppel.crd`).

These models are the single source of truth: the operator parses objects with them, and `doppel crd`
turns their JSON schema into the structural OpenAPI v3 schema the API server validates with. Field names
are camelCase on the wire (Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic.alias_generators import to_camel

from doppel.defaults import MAX_SAMPLES

GROUP = "doppel.dev"
VERSION = "v1alpha1"
KIND = "DoppelUser"
PLURAL = "doppelusers"
SINGULAR = "doppeluser"
SHORT_NAME = "doppel"
# The Slack workspace an object belongs to (DoppelUsers, bot token Secrets): workspaces share namespaces.
LABEL_TEAM = f"{GROUP}/slack-team"
# Set ("true") by the bot when Slack says the person was deactivated: the operator starts no Job for the
# DoppelUser and unloads its adapter (condition PersonActive False) until the annotation goes.
ANNOTATION_DEACTIVATED = f"{GROUP}/person-deactivated"

Phase = Literal["Pending", "Scraping", "Training", "Registering", "Ready", "Failed"]
# StorageWritable: False when a Job could not write the shared volume (permissions, read-only, full).
ConditionType = Literal[
    "Scraped", "Trained", "Promoted", "Registered", "Ready", "PersonActive", "StorageWritable"
]
Retention = Literal["Delete", "Keep"]

# Kubernetes object names (DNS-1123 subdomain / label) and Slack IDs.
DNS_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SLACK_TEAM_ID = r"^[TE][A-Z0-9]{2,}$"
SLACK_USER_ID = r"^[UW][A-Z0-9]{2,}$"
# A path relative to the shared volume: no leading slash, no component starting with a dot (so no `..`).
# RE2 syntax (the API server's), so no look-arounds.
RELATIVE_PATH = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$"
# Five cron fields (minute hour day month weekday) or a @-macro: the shape, in the schema's pattern...
CRON = r"^(@(yearly|annually|monthly|weekly|daily|hourly)|(\S+\s+){4}\S+)$"


def _cron_field(value: str, names: bool = False, any_day: bool = False) -> str:
    """One cron field in RE2 without backslashes (it goes into a CEL string): comma-separated values or
    ranges of `value`, or `*`, each with an optional step."""
    item = f"({value}|[A-Za-z]{{3}})" if names else f"({value})"
    one = rf"([*{'?' if any_day else ''}]|{item}(-{item})?)(/[0-9]{{1,2}})?"
    return f"{one}(,{one})*"


# ...and each field's values and ranges, in a CEL rule the API server runs with a readable message.
CRON_FIELDS = (
    r"^(@(yearly|annually|monthly|weekly|daily|hourly)|"
    + " +".join(
        (
            _cron_field("[0-5]?[0-9]"),
            _cron_field("[01]?[0-9]|2[0-3]"),
            _cron_field("0?[1-9]|[12][0-9]|3[01]", any_day=True),
            _cron_field("0?[1-9]|1[0-2]", names=True),
            _cron_field("[0-7]", names=True, any_day=True),
        )
    )
    + r")$"
)
CRON_MESSAGE = (
    "must be a cron schedule as CronJob takes it: five fields (minute 0-59, hour 0-23, day of month 1-31, "
    "month 1-12, day of week 0-7) or @hourly, @daily, @weekly, @monthly, @yearly; e.g. '0 3 * * 1'"
)
TIME_ZONE = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class _Model(BaseModel):
    """camelCase on the wire, unknown fields refused (the API server prunes them; we must not guess)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(_Model):
    """A key of a Secret in the DoppelUser's namespace."""

    name: str = Field(pattern=DNS_NAME, max_length=253, description="Secret name.")
    key: str = Field(default="token", min_length=1, description="Key holding the value.")


class Target(_Model):
    """The person to clone: give at least one of these."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    @model_validator(mode="after")
    def _one_given(self) -> Target:
        if not (self.user_id or self.handle or self.real_name):
            raise ValueError("target needs userId, handle or realName")
        return self

    user_id: str | None = Field(default=None, pattern=SLACK_USER_ID, description="Slack user ID (U...).")
    handle: str | None = Field(default=None, min_length=1, description="Display name / handle.")
    real_name: str | None = Field(default=None, min_length=1, description="Full name as in the profile.")


class Channels(_Model):
    include: list[str] = Field(default_factory=list, description="Only these channels (names or IDs).")
    exclude: list[str] = Field(default_factory=list, description="Never these channels (names or IDs).")


class Slack(_Model):
    """Where the messages come from: the Slack Web API, or an export ZIP on the shared volume."""

    # Checked by the API server too (CEL), since JSON schema alone cannot say "one of these two".
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.tokenSecretRef) || has(self.exportPath)",
                    "message": "set tokenSecretRef (Slack API) or exportPath (Slack export)",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _has_source(self) -> Slack:
        if self.token_secret_ref is None and self.export_path is None:
            raise ValueError("set tokenSecretRef (Slack API) or exportPath (Slack export)")
        return self

    team_id: str = Field(pattern=SLACK_TEAM_ID, description="Slack workspace (team) ID.")
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Bot token Secret; required unless exportPath is set."
    )
    channels: Channels = Field(default_factory=Channels)
    export_path: str | None = Field(
        default=None, pattern=RELATIVE_PATH, description="Slack export ZIP, relative to the shared volume."
    )
    rate_profile: Literal["internal", "marketplace", "non-marketplace"] = Field(
        default="internal",
        description="The kind of Slack app the token belongs to, whose rate limits the scrape starts from "
        "(non-marketplace: 1 history/replies call a minute); it learns the real ones from Slack's 429s.",
    )


class Data(_Model):
    cutoff_days: int = Field(default=365, ge=1, le=3650, description="Only messages newer than this.")
    min_length: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="Shortest message kept as a target, in characters; unset: the person's median message "
        "length, from 20 to 100.",
    )
    max_samples: int = Field(default=MAX_SAMPLES, ge=1, le=100000, description="Newest samples kept at most.")
    scrub: bool = Field(
        default=True,
        description="Replace secrets, emails and phone numbers with placeholders before training.",
    )


class BaseModelRef(_Model):
    served_name: str = Field(min_length=1, description="Model name vLLM serves the base model under.")
    path: str = Field(min_length=1, description="Weights location (path or HF ID).")


class Training(_Model):
    rank: int = Field(default=32, ge=1, le=256, description="LoRA rank (at most vLLM's --max-lora-rank).")
    alpha: int = Field(default=64, ge=1, le=1024)
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Peak learning rate (cosine schedule); unset: the base model's own, 0.003 for the "
        "built-in SmolLM2-135M, else 0.0003 (for base models of a billion parameters or more).",
    )
    epochs: int = Field(default=2, ge=1, le=100)
    max_steps: int | None = Field(
        default=None, ge=1, le=1000000, description="Optimizer steps per epoch, at most."
    )
    batch_size: int = Field(default=16, ge=1, le=1024, description="Effective batch size.")
    min_samples: int = Field(default=20, ge=1, le=100000, description="Fewer samples fail as bad input.")
    force_promotion: bool = Field(
        default=False,
        description="Serve a retrained adapter even if its fidelity report is worse than the serving one's.",
    )


class Resources(_Model):
    gpu: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu for the train Job.")
    cpu: str | None = Field(default=None, pattern=QUANTITY)
    memory: str | None = Field(default=None, pattern=QUANTITY)


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Vllm(_Model):
    selector: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "vllm"},
        min_length=1,
        description="Labels of the vLLM pods the adapter is loaded on.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Fallback when the pod names no port.")


class RetentionPolicy(_Model):
    after_training: Retention = Field(
        default="Delete", description="Scraped data once the adapter exists (deleted by default)."
    )
    on_deletion: Retention = Field(default="Delete", description="Adapters and data when the object goes.")


class DoppelUserSpec(_Model):
    slack: Slack
    target: Target
    data: Data = Field(default_factory=Data)
    base_model: BaseModelRef
    training: Training = Field(default_factory=Training)
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    vllm: Vllm = Field(default_factory=Vllm)
    retrain_schedule: str | None = Field(
        default=None,
        max_length=100,  # bounds the CEL rule's cost, as the API server requires
        description="Cron schedule to retrain, as a CronJob's spec.schedule (times in timeZone).",
        json_schema_extra={
            # The pattern for the schema only: the model's validator below says what is wrong.
            "pattern": CRON,
            "x-kubernetes-validations": [{"rule": f"self.matches('{CRON_FIELDS}')", "message": CRON_MESSAGE}],
        },
    )
    time_zone: str | None = Field(
        default=None,
        pattern=TIME_ZONE,
        max_length=64,
        description="IANA time zone of retrainSchedule, as a CronJob's spec.timeZone (default UTC).",
    )
    retrain_requested_at: datetime | None = Field(
        default=None, description="Change it to retrain now (the operator does when the schedule is due)."
    )
    suspend: StrictBool = Field(default=False, description="Start no new Jobs while true.")
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy)

    @field_validator("retrain_schedule")
    @classmethod
    def _valid_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            if not re.match(CRON_FIELDS, value):
                raise ValueError(CRON_MESSAGE)
            from croniter import croniter

            try:
                croniter(value)  # what the regular expression cannot see, such as a step of 0
            except ValueError as exc:
                raise ValueError(f"{CRON_MESSAGE} ({exc})") from None
        return value

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone {value!r} (want an IANA name such as Europe/Paris)"
                ) from None
        return value


class TrainDefaults(_Model):
    """What the train Job of a DoppelUser that leaves these fields out gets: the cluster's choice (the
    operator's `--train-defaults`, the chart's `operator.trainDefaults`). The one place such defaults live,
    so a DoppelUser applied with kubectl and one created by `/doppel train` are scheduled alike."""

    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


def with_train_defaults(spec: DoppelUserSpec, defaults: TrainDefaults) -> DoppelUserSpec:
    """`spec` with each of resources, nodeSelector and tolerations taken from `defaults` when the object
    does not set it (as written: an empty list set on purpose stays empty)."""
    unset = {
        name: getattr(defaults, name)
        for name in TrainDefaults.model_fields
        if name not in spec.model_fields_set
    }
    return spec.model_copy(update=unset)


def with_vllm_selector(spec: DoppelUserSpec, selector: dict[str, str] | None) -> DoppelUserSpec:
    """`spec` with `selector` (the operator's: its release's vLLM pods) as spec.vllm.selector when the object
    names none; the built-in default matches any vLLM of the namespace, so the chart always gives one."""
    if not selector or "selector" in spec.vllm.model_fields_set:
        return spec
    return spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"selector": dict(selector)})})


class Condition(_Model):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(default=None, ge=0)


class TrainingProgress(_Model):
    step: int = Field(default=0, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = Field(default=None, ge=0)
    loss: float | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps, in percent.")
    updated_at: datetime | None = Field(default=None, description="When these figures last changed.")


class EvalSummary(_Model):
    """Headline figures of the adapter's fidelity report (eval.json beside it; see `doppel eval`)."""

    heldout_loss_base: float | None = None
    heldout_loss_adapter: float | None = None
    likeness_adapter: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of held-out replies the authorship classifier gives the person.",
    )
    likeness_prompted_base: float | None = Field(
        default=None, ge=0, le=1, description="The same for the base model with a persona prompt."
    )
    likeness_real: float | None = Field(
        default=None, ge=0, le=1, description="The same for the person's real held-out replies (the ceiling)."
    )
    likeness_classifier_accuracy: float | None = Field(default=None, ge=0, le=1)
    relevance_adapter: float | None = Field(
        default=None,
        description="Closeness to the real reply of the same context, beyond any reply of theirs.",
    )
    relevance_prompted_base: float | None = None
    distinct_adapter: float | None = Field(default=None, ge=0, le=1, description="Share not near-duplicates.")
    copy_rate_adapter: float | None = Field(
        default=None, ge=0, le=1, description="Share repeating 12+ words of a training message."
    )
    heldout_samples: int | None = Field(default=None, ge=0)


class ScrapeProgress(_Model):
    channels_done: int = Field(default=0, ge=0, description="Channels scraped or skipped.")
    channels_total: int = Field(default=0, ge=0)
    messages: int = Field(default=0, ge=0, description="Messages fetched so far.")
    rate_limited: int = Field(default=0, ge=0, description="429 answers waited out so far.")
    wait_s: float | None = Field(default=None, ge=0, description="Seconds left of the wait for Slack.")
    waiting_on: str | None = Field(default=None, description="The method the scrape waits to call.")
    updated_at: datetime | None = Field(default=None, description="When these figures last changed.")


class JobRecord(_Model):
    """The current step's latest Job as the operator last saw it: what it goes on from once it is gone."""

    step: Literal["scrape", "train", "purge"]
    attempt: int = Field(default=1, ge=1)
    outcome: Literal["Running", "Succeeded", "Failed"]
    reason: str | None = Field(default=None, description="Why it failed.")


class Adapter(_Model):
    served_name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="Adapter directory as the vLLM pods see it.")
    version: int = Field(ge=1)
    trained_at: datetime | None = None


class DoppelUserStatus(_Model):
    model_config = ConfigDict(extra="ignore")

    phase: Phase = "Pending"
    reason: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(default=None, ge=0)
    samples: int | None = Field(default=None, ge=0)
    scraping: ScrapeProgress | None = None
    training: TrainingProgress | None = None
    eval: EvalSummary | None = Field(default=None, description="The last trained adapter's fidelity figures.")
    adapter: Adapter | None = None
    served_by: list[str] = Field(default_factory=list, description="vLLM pods holding the adapter.")
    attempt: int = Field(default=1, ge=1, description="Attempt number of the current step's Job.")
    retry_at: datetime | None = Field(default=None, description="Earliest time of the next attempt.")
    queued_at: datetime | None = Field(default=None, description="When it joined the training queue.")
    pending_adapter: Adapter | None = Field(
        default=None, description="Adapter being registered; becomes `adapter` once loaded everywhere."
    )
    last_trained_at: datetime | None = None
    next_schedule_time: datetime | None = Field(
        default=None, description="When retrainSchedule next retrains (as a CronJob's next run would start)."
    )
    last_job: JobRecord | None = None
    spec_generation: int | None = Field(
        default=None,
        ge=1,
        description="The generation the Jobs and the adapter version belong to: the last spec change other "
        "than spec.suspend.",
    )
    spec_digest: str | None = Field(
        default=None, description="Digest of that generation's spec, suspend left out."
    )
    pruned_generation: int | None = Field(
        default=None,
        ge=1,
        description="Generation whose older adapter versions were pruned (not pruned again).",
    )

"""All service configuration, from environment variables prefixed ``ERC_`` (e.g. ``ERC_PORT=9000``).

One pydantic-settings class, read once and served through a cached dependency
(:func:`get_settings`), so tests and ``erc serve`` flags can override it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from service.audit.store import JobStore


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERC_", env_file=None, extra="ignore")

    # -- network --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to listen on all interfaces")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port)")

    # -- models ---------------------------------------------------------------------------------
    model_store: Path = Field(
        Path("model_store"), description="folder of NAME/{card.json,weights.safetensors}"
    )
    models: list[str] | None = Field(
        None, description="names to serve (comma-separated); default: all in the store"
    )
    default_model: str | None = Field(
        None, description="the model readiness depends on; default: mnist-er or first"
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (CUDA when present)")
    require_all_models: bool = Field(False, description="/readyz fails if any model failed to load")

    # -- batching -------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="rows per forward pass")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="longest wait for a batch to fill under load"
    )
    batch_gap_ms: float = Field(
        3.0,
        ge=0,
        le=1000,
        description="stop waiting for a batch once no request arrived for this long (none being read)",
    )
    max_queue: int = Field(256, ge=1, description="queued rows per model before 503 + Retry-After")
    queue_timeout_s: float = Field(30.0, gt=0, description="longest a request may wait for its result")
    workers: int = Field(1, ge=1, le=64, description="inference threads per model, sharing its queue")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores")
    fast_path: bool = Field(
        True, description="serve the inference routes without FastAPI's per-request stack"
    )
    warmup: bool = Field(True, description="run each model once per batch size bucket before reporting ready")
    http_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP processes of erc serve: 1 runs HTTP and the model in one process; N > 1 starts "
        "one model process that batches the requests of N HTTP processes sharing the port (docs/deploy.md)",
    )
    model_process_socket: Path | None = Field(
        None,
        description="set by erc serve for its HTTP processes (the model process's Unix socket); not a "
        "user setting",
    )

    # -- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body limit (413 beyond)")
    max_instances: int = Field(64, ge=1, description="images per request (413 beyond)")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="decoded width*height limit (413 beyond)")

    # -- admin and audits ------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="bearer token of /admin routes; unset disables them"
    )
    audit_db: str = Field(
        "sqlite:///var/audits.db",
        description="the audit job store shared by API replicas and audit workers: sqlite:///PATH (one "
        "host; the default lies in var/, which git ignores) or postgresql://USER:PASSWORD@HOST:PORT/DB",
    )
    repository_poll_s: float = Field(
        2.0,
        gt=0,
        description="with the admin routes on: how often each replica reads the model repository's record "
        "(loads and unloads said to another replica take effect here within this time)",
    )
    repository_load_timeout_s: float = Field(
        120.0, gt=0, description="how long a repository load request waits for the model (202 after that)"
    )
    audit_db_password: SecretStr | None = Field(
        None, description="password for the audit store's URL when the URL has none (keeps it out of URLs)"
    )
    audit_local_worker: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run audits in this API process (auto: with a SQLite store; off when dedicated "
        "`erc audit-worker` processes run them)",
    )
    audit_lease_s: float = Field(
        30.0, ge=1, le=3600, description="a worker silent this long has lost its audit (re-queued)"
    )
    audit_heartbeat_s: float = Field(
        2.0, gt=0, le=600, description="how often a worker renews its lease, records progress, sees cancels"
    )
    audit_worker_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Prometheus port of `erc audit-worker` (0: none)"
    )
    audit_max_attempts: int = Field(
        3, ge=1, le=100, description="runs of an audit whose workers died before it is marked failed"
    )
    audit_device: str = Field("auto", description="device of audits: auto (CUDA when present), cpu, cuda:N")
    audit_threads: int | None = Field(
        None, ge=1, description="torch threads of the audit process; default: half"
    )
    audit_niceness: int = Field(10, ge=0, le=19, description="nice value of the audit process (CPU priority)")
    audit_sched_idle: bool = Field(
        True,
        description="run the audit process under SCHED_IDLE (Linux): it gets a CPU only when idle",
    )
    audit_max_work: float = Field(
        5e6, gt=0, description="largest audit: samples x eps levels x forward-backward passes per sample"
    )
    audit_max_n: int = Field(10000, ge=1, description="largest number of audited samples")
    audit_max_queued: int = Field(
        4, ge=0, description="audits waiting beyond those idle workers take at once (409 beyond)"
    )
    audit_keep: int = Field(200, ge=1, description="finished audits kept in the store (GET /admin/audits)")

    # -- per-request attack check (POST /v1/models/{name}:attack) and the console -----------------
    attack_access: Literal["public", "admin", "off"] = Field(
        "public",
        description="who may call :attack: everyone, only holders of the admin token, or nobody (403)",
    )
    attack_max_instances: int = Field(8, ge=1, le=64, description="images per :attack request (413 beyond)")
    attack_max_steps: int = Field(100, ge=1, le=1000, description="largest PGD steps of :attack (413 beyond)")
    attack_max_restarts: int = Field(
        5, ge=1, le=20, description="largest PGD restarts of :attack (413 beyond)"
    )
    attack_max_work: float = Field(
        5000,
        gt=0,
        description="largest :attack request: images x steps x restarts x attack runs (the smallest-eps "
        "search adds runs); 413 beyond",
    )
    attack_concurrency: int = Field(
        1, ge=1, le=16, description="attack-check child processes (attacks running at once, server-wide)"
    )
    attack_max_queue: int = Field(
        4, ge=0, le=1024, description=":attack requests waiting for a child (429 + Retry-After beyond)"
    )
    attack_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="longest an :attack request waits and runs (then 503)"
    )
    attack_threads: int = Field(1, ge=1, le=256, description="torch threads of each attack-check child")
    attack_niceness: int = Field(10, ge=0, le=19, description="nice value of the attack-check children")
    attack_sched_idle: bool = Field(
        True,
        description="run attack-check children under SCHED_IDLE (Linux): they get a CPU only when "
        "predictions leave one idle",
    )
    embedding_map_n: int = Field(
        2000, ge=10, le=10000, description="test images on the console's 2-D embedding map (per model)"
    )
    console: bool = Field(True, description="serve the web console at / and /console")

    log_level: str = Field("info", description="debug, info, warning, error")
    shutdown_grace_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="after SIGTERM, keep serving this long while /readyz answers 503 (draining), so a "
        "load balancer stops sending requests before connections close; a second signal stops at once",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()] or None
        return value

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        # The audit device is resolved where audits run (an audit worker may have the GPU the API lacks).
        if value in ("auto", "cpu"):  # always valid; asking torch would import it into processes
            return value  # that need none (erc serve's supervisor)
        from training.devices import DeviceUnavailable, resolve_device

        try:
            resolve_device(value)
        except DeviceUnavailable as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("audit_db")
    @classmethod
    def _audit_db_url(cls, value: str) -> str:
        from service.audit.store import normalize_url

        normalize_url(value)  # raises ValueError naming what is wrong
        return value

    def audit_store(self) -> JobStore:
        """The audit job store these settings name (not opened yet)."""
        from service.audit.store import JobStore

        password = self.audit_db_password.get_secret_value() if self.audit_db_password else None
        return JobStore(
            self.audit_db,
            password=password,
            lease_s=self.audit_lease_s,
            connect_timeout_s=min(5.0, self.audit_lease_s),
        )

    @property
    def runs_local_worker(self) -> bool:
        """Whether this API process runs audits itself (embedded mode)."""
        if self.audit_local_worker == "auto":
            return self.audit_db.startswith("sqlite")
        return self.audit_local_worker == "on"

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.audit_heartbeat_s * 2 > self.audit_lease_s:
            raise ValueError(
                f"audit_heartbeat_s ({self.audit_heartbeat_s}) must be at most half of audit_lease_s "
                f"({self.audit_lease_s}): one late heartbeat must not lose a live worker its audit"
            )
        if self.max_instances > self.max_queue:
            raise ValueError(
                f"max_instances ({self.max_instances}) must not exceed max_queue ({self.max_queue})"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

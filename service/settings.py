"""The server's one settings object: from `NORMFUSE_*` environment variables, overridden by CLI flags.

Built inside the CLI / app factory, never at import time. Validators reject nonsense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.restricted import Restriction, parse_specs

Sizes = Annotated[list[int], NoDecode]  # "1,4,8" in the environment, not JSON
Names = Annotated[list[str], NoDecode]  # "cuda,tensorrt"
Restrictions = Annotated[list[Restriction], NoDecode]  # "API[,API]:HEADER=VALUE[;...]"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMFUSE_", extra="forbid")

    repo: Path = Field(description="model repository: REPO/NAME/manifest.json per model")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port; 0 picks a free one")
    grpc_port: int = Field(8001, ge=0, le=65535, description="OIP v2 over gRPC on this port (Triton's); 0 = no gRPC")
    backend: Literal["onnxruntime", "tensorrt", "torch"] = Field("onnxruntime", description="engine runtime: "
                                                                 "onnxruntime | tensorrt | torch")
    precision: Literal["fp32", "fp16"] | None = Field(None, description="TensorRT plan precision; None = newest plan")
    max_batch_size: int = Field(16, ge=1, description="cap per engine run (also capped by the manifest)")
    max_queue_delay_ms: float = Field(0.0, ge=0, le=60_000, description="fixed batching window: how long the first "
                                      "request waits for company; 0 = adaptive (run at once with what is queued)")
    preferred_batch_sizes: Sizes = Field(default_factory=list, description="dispatch at once on reaching one")
    max_queue_size: int = Field(256, ge=1, description="requests waiting per (model, variant); more -> 503")
    default_variant: str | None = Field(None, description="the variant a request without a version gets, for every "
                                        "model (instead of the manifest's default); a model without it is not ready")
    shadow_rate: float = Field(0.0, ge=0.0, le=1.0, description="fraction of served batches re-run on unfused")
    # -- limits: enforced before work, the same for REST and gRPC (service.inference, service.body) -------------
    max_body_bytes: int = Field(64 << 20, ge=1024, description="larger request bodies (and gRPC messages) -> 413")
    max_inflight: int = Field(64, ge=1, description="inference requests in the server at once once their body is "
                              "in, decoding included; more -> 503 (refused from the headers while all are taken)")
    body_timeout_s: float = Field(60.0, gt=0, description="a request body must be in within this many seconds of "
                                  "its headers -> else 408, connection closed")
    min_upload_bytes_per_s: int = Field(8192, ge=0, description="after its first second a body must keep coming at "
                                        "this average rate at least -> else 408, connection closed; 0 = no rate")
    max_receiving_bytes: int = Field(256 << 20, ge=1024, description="bytes of request bodies being received at "
                                     "once, all requests together; a body that would pass it -> 503")
    max_connections: int = Field(1024, ge=1, description="HTTP connections and requests at once (uvicorn's "
                                 "limit_concurrency); more -> 503 from uvicorn")
    max_grpc_rpcs: int = Field(256, ge=1, description="gRPC calls at once (grpcio's maximum_concurrent_rpcs); "
                               "more -> RESOURCE_EXHAUSTED")
    max_control_body_bytes: int = Field(64 << 10, ge=1024, description="larger bodies on the repository routes "
                                        "(index, load, unload) -> 413")
    max_response_bytes: int = Field(256 << 20, ge=1024, description="an answer larger than this (computed from the "
                                    "output specs and the request's shapes, before compute) -> 413; sized for a "
                                    "2 GiB pod, where a JSON answer costs ~10x its size while it is built")
    max_json_response_bytes: int = Field(16 << 20, ge=1024, description="a JSON answer larger than this -> 413 "
                                         "with a hint to ask for binary outputs (binary_data_output)")
    offload_bytes: int = Field(256 << 10, ge=0, description="bodies at least this large are decoded and encoded "
                               "on a worker thread, not on the event loop")
    engine_timeout_s: float = Field(60.0, gt=0, description="an engine call running longer fails its batch (503) "
                                    "and makes its variant not ready until it returns")
    engine_recovery_s: float = Field(60.0, gt=0, description="a hung engine call not back this long after "
                                     "engine_timeout_s turns /v2/health/live false (the pod gets restarted)")
    warmup_batch_sizes: Sizes = Field(default_factory=lambda: [1], description="each warmed up before ready")
    intra_op_threads: int = Field(0, ge=0, description="engine threads; 0 = the backend's default")
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch backend: where the module runs")
    torch_mode: Literal["eager", "compile"] = Field("eager", description="torch backend: eager or torch.compile")
    ort_providers: Names = Field(default_factory=list, description="onnxruntime backend: execution providers in "
                                 "order, e.g. cuda,tensorrt (CPU is always appended); empty = CPU")
    ort_allow_spinning: bool = Field(False, description="onnxruntime backend: let pool threads busy-wait")
    openvino_streams: int = Field(0, ge=0, description="OpenVINO plans: NUM_STREAMS; 0 = OpenVINO's choice for "
                                  "the hint")
    # THROUGHPUT: one infer request per stream, the batcher keeps that many batches in flight; measured (docs/plans.md,
    # "Serving defaults"): 1.02x LATENCY's items/s at batch 16 on a quiet machine, up to 4-7x on a loaded one;
    # LATENCY is ~1.5x faster only for a lone request on an idle machine
    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = Field("THROUGHPUT", description="OpenVINO plans: "
                                                            "PERFORMANCE_HINT (THROUGHPUT: several batches at once)")
    openvino_plans: Literal["all", "default"] = Field("all", description="OpenVINO plans served as versions: all "
                                                      "this CPU runs natively, or only the default plan (each plan "
                                                      "holds its own compiled weights)")
    openvino_cache_dir: Path | None = Field(None, description="OpenVINO plans: compiled-model cache directory (keyed "
                                            "by the sha256 of every model file, OpenVINO version, CPU and "
                                            "properties); none = compile at each load")
    drain_timeout_s: float = Field(30.0, gt=0, description="on shutdown, how long queued work may take to finish")
    compare_window: int = Field(512, ge=8, description="recent samples kept per variant and batch size for /compare")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug | info | warning | error")
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none", description="none: load every model at start, no changes; poll: also re-scan the repository every "
        "repository_poll_secs and swap in re-converted models; explicit: load load_model at start, then only "
        "through POST /v2/repository/models/NAME/load|unload")
    load_model: Names = Field(default_factory=list, description="explicit mode: the models loaded at start "
                              "('*' = all); repeatable flag, comma-separated in the environment")
    restricted_api: Restrictions = Field(
        default_factory=list, description="API[,API...]:HEADER=VALUE: these API groups (health, metadata, "
        "inference, model-config, model-repository, statistics) answer only requests whose header (gRPC: metadata) "
        "HEADER carries VALUE, others get 403 / PERMISSION_DENIED; repeatable flag, ';'-separated in the "
        "environment; the value is never logged")
    repository_poll_secs: float = Field(15.0, gt=0, description="poll mode: seconds between repository scans")

    @field_validator("repo")
    @classmethod
    def _repo_is_a_directory(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model repository {value} is not a directory; run `normfuse convert ... --repo {value}`")
        return value

    @field_validator("preferred_batch_sizes", "warmup_batch_sizes", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):  # "1,4,8" from the environment or the CLI
            return [int(part) for part in value.replace(" ", "").split(",") if part]
        if isinstance(value, int):
            return [value]
        return value

    @field_validator("ort_providers", "load_model", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):  # a repeated flag's values may each be a list: "a,b"
            return [part for item in value for part in str(item).replace(" ", "").split(",") if part]
        return value

    @field_validator("load_model")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if name != "*" and ("/" in name or "\\" in name or name.startswith("."))]
        if bad:
            raise ValueError(f"{bad} are not model names (one directory of the repository: no '/', '\\' or "
                             "leading '.')")
        return value

    @field_validator("restricted_api", mode="before")
    @classmethod
    def _parse_restrictions(cls, value: object) -> list[Restriction]:
        return parse_specs(value)

    @field_validator("preferred_batch_sizes", "warmup_batch_sizes")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError(f"batch sizes must be >= 1, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _sizes_fit(self) -> Settings:
        for name in ("preferred_batch_sizes", "warmup_batch_sizes"):
            too_big = [size for size in getattr(self, name) if size > self.max_batch_size]
            if too_big:
                raise ValueError(f"{name} {too_big} exceed max_batch_size {self.max_batch_size}")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(f"load_model {self.load_model} needs model_control_mode explicit (--model-control-mode "
                             f"explicit); in {self.model_control_mode!r} mode every model is loaded")
        return self

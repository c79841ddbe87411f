"""Environment-only settings: where the embedded state, the artifact store and MLflow live."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Read from the environment each time it is built; nothing happens at import.

    NPUFLOW_HOME       embedded state (default ./.npuflow): sqlite, local artifacts, download cache
    NPUFLOW_STORE_URI  artifact store: s3://bucket/prefix (AWS_ENDPOINT_URL etc. for MinIO/OBS) or a
                       directory (default <home>/artifacts)
    MLFLOW_TRACKING_URI  MLflow server or database (default sqlite:///<home>/mlflow.db)
    """

    model_config = SettingsConfigDict(env_prefix="NPUFLOW_", extra="ignore", frozen=True)

    home: Path = Path(".npuflow")
    store_uri: str | None = None
    tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "NPUFLOW_TRACKING_URI")
    )

    @property
    def home_dir(self) -> Path:
        return self.home.resolve()

    @property
    def resolved_store_uri(self) -> str:
        return self.store_uri or (self.home_dir / "artifacts").as_uri()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def cache_dir(self) -> Path:
        """Local copies of remote artifacts (verified by sha256)."""
        return self.home_dir / "cache"

    @property
    def mlflow_artifact_location(self) -> str | None:
        """Where MLflow run artifacts go: beside the pipeline's artifacts in S3; a tracking server's
        own default (None) when the store is local to this machine; else <home>/mlartifacts."""
        if self.resolved_store_uri.startswith("s3://"):
            return self.resolved_store_uri.rstrip("/") + "/mlflow"
        if self.resolved_tracking_uri.startswith(("http://", "https://", "databricks")):
            return None
        return (self.home_dir / "mlartifacts").as_uri()

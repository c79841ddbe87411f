"""The MLflow registry: client, promotion, tolerance, rollback, nightly check."""

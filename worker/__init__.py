"""Ray Train / Ray Tune workers and MLflow tracking (built on byol_core)."""

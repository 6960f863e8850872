-- MLflow's tracking store lives beside the service's database on the same server, in a database
-- of its own (both keep an alembic_version table). Run once, when the data volume is created.
CREATE DATABASE mlflow;

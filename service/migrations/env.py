"""Alembic environment: online migrations only, serialised by an advisory lock on PostgreSQL so
that an API and a worker starting together do not race to create the schema."""

from alembic import context
from sqlalchemy import create_engine, pool, text

from service.db import Base

LOCK_ID = 0x6279_6F6C  # "byol"

url = context.config.get_main_option("sqlalchemy.url")
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": LOCK_ID})
        connection.commit()
    try:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if postgres:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
            connection.commit()
engine.dispose()

"""The job service: FastAPI, SQL and a Redis queue. Never imports torch."""

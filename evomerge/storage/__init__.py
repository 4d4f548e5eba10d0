"""SQLAlchemy models, the repository the runner and the service share, and alembic migrations."""

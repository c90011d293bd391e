"""The Celery side of imgpipe: app, thin tasks, cross-message batching, result store and metrics."""

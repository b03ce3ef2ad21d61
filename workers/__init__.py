"""Workers: the Celery task, the Bun runner and its wrapper, the worker process."""

"""The CNN: define, train, evaluate, export, load, preprocess and predict (pure PyTorch; no Celery/Redis)."""

"""Online ranking: `Ranker` (ranker.py), the HTTP app (app.py), hot reload (reload.py), Ray Serve (ray_app.py).

Submodules are imported explicitly (`from recsys.serving.ranker import Ranker`), so batch scoring
can use the Ranker without importing FastAPI or Ray Serve.
"""

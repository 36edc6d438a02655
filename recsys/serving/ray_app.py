"""Scale-out: the ranking app as a Ray Serve deployment.

Each replica loads its own Ranker and serves the very app `muse serve` runs under uvicorn (same
validation, limits, metrics and alias polling), built inside the replica through Ray Serve's
late-bound ingress (`__serve_build_asgi_app__`, Ray >= 2.60). Ray Serve's proxy spreads requests
over the replicas; `max_ongoing_requests` caps what the proxy sends each replica, and the app's
own concurrency bound still answers 503 beyond it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ray import serve
from ray.serve.config import HTTPOptions

from recsys.serving.app import ServeSettings
from recsys.serving.service import serving_app


@serve.deployment(name="muse-ranker")
@serve.ingress()
class RankerDeployment:
    """One replica: a Ranker over `data_dir` behind the ranking app.

    Args mirror `serving_app`; `settings` is a ServeSettings as a dict (plain data crosses
    process boundaries in Ray without pickling our classes).
    """

    def __init__(
        self,
        model_uri: str,
        data_dir: str,
        settings: dict,
        tracking_uri: str | None = None,
        table_dtype: str = "float16",
        poll_interval_s: float = 30.0,
    ):
        self._app = serving_app(
            model_uri,
            data_dir,
            ServeSettings(**settings),
            tracking_uri=tracking_uri,
            table_dtype=table_dtype,
            poll_interval_s=poll_interval_s,
        )

    def __serve_build_asgi_app__(self):
        return self._app


def ranker_application(
    model_uri: str,
    data_dir: str | Path,
    settings: ServeSettings = ServeSettings(),
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    tracking_uri: str | None = None,
    table_dtype: str = "float16",
    poll_interval_s: float = 30.0,
) -> serve.Application:
    """The bound Ray Serve application: `replicas` copies of the ranking app.

    Unless `settings.torch_threads` says otherwise, each replica's scoring threads share its
    `cpus_per_replica` (a replica sees every core of its node, not its Ray CPU share).
    """
    if settings.torch_threads is None:
        settings = dataclasses.replace(settings, torch_threads=max(1, int(cpus_per_replica) // settings.scoring_threads))
    deployment = RankerDeployment.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=settings.max_concurrency,
    )
    return deployment.bind(
        model_uri,
        str(Path(data_dir).resolve()),
        dataclasses.asdict(settings),
        tracking_uri=tracking_uri,
        table_dtype=table_dtype,
        poll_interval_s=poll_interval_s,
    )


def run_on_ray(application: serve.Application, host: str, port: int, blocking: bool = True) -> None:
    """Start Serve's HTTP proxy on host:port and deploy `application` at the root route."""
    serve.start(http_options=HTTPOptions(host=host, port=port))
    serve.run(application, name="muse", route_prefix="/", blocking=blocking)

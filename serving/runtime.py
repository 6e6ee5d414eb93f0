"""Starts (or joins) Ray, Serve with its gRPC ingress, and the worker app."""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from loraserve.config import Settings
from serving.app import SERVICER_FUNCTIONS, build_app

log = logging.getLogger(__name__)


def start_workers(settings: Settings) -> None:
    if not ray.is_initialized():
        init_args: dict[str, object] = {"address": settings.ray_address or None, "include_dashboard": False}
        if not settings.ray_address and settings.ray_num_cpus:
            init_args["num_cpus"] = settings.ray_num_cpus
        ray.init(**init_args)  # type: ignore[arg-type]
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=settings.serve_http_port),
        grpc_options=gRPCOptions(port=settings.serve_grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    serve.run(build_app(settings), name=settings.serve_app_name, route_prefix=f"/{settings.serve_app_name}")
    log.info("workers ready", extra={"app": settings.serve_app_name, "grpc_port": settings.serve_grpc_port})


def stop_workers() -> None:
    serve.shutdown()
    ray.shutdown()

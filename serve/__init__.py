"""kolors_trt.serve: the HTTP server (FastAPI + uvicorn) speaking OpenAI's Images API.

    config.py     the settings: ServeConfig fields and defaults, their flags, config_from_args, the batch ceiling
    errors.py     the server's typed errors and the one table mapping error types to HTTP
    scheduler.py  the batcher: a pure object, queue in, batch out
    worker.py     Worker: the thread that owns the Pipeline and runs generate_batch
    metrics.py    Prometheus metrics on a registry of the worker's own
    protocol.py   request bodies (pydantic), the rules for fields, their translation into GenerationRequests
    images.py     output encoding (PNG text chunks) and the cheap latent previews
    middleware.py pure-ASGI guards: request id, access log, body limit, API key, drain, request metrics
    routes.py     the OpenAI Images routes and /v1/references
    openapi.py    the OpenAPI document: multipart bodies, this server's limits, every answer
    app.py        create_app(config): the FastAPI app (also the Ray Serve ingress)
    transport.py  the header timeout: a uvicorn protocol that closes connections whose head never completes
    cli.py        `kolors-trt serve`: uvicorn, SIGTERM drain, exit codes; --ray
    ray_app.py    the Ray Serve deployment: replicas of the app, one Worker each (the only ray import)
    ray_local.py  the local Ray instance of `serve --ray`: its temporary folder and its processes
"""

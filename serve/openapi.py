"""The OpenAPI document (GET /openapi.json): what the server really does, so that a client
generator or a fuzzer (schemathesis) reading it sends what the server takes and expects
what it answers.

FastAPI's own document knows the JSON body of generations and nothing else. This adds:

- the multipart bodies of /v1/images/edits (the reference ``image`` and the text fields,
  numbers and booleans as the text multipart carries) and /v1/references;
- the limits of this server and folder: ``size`` as a pattern of exactly the sizes the
  profile takes, ``n`` up to the batch ceiling, ``num_inference_steps`` up to
  --max-steps, prompts up to --max-prompt-chars, and on generations the rule that a
  non-zero ``ip_adapter_scale`` needs a ``reference_id``; ``guidance_interval`` as two
  non-negative numbers (JSON) or the text LOW:HIGH (multipart). Its rule low < high is
  in its description: JSON Schema cannot compare two items (the fuzz test applies it);
- every answer: 200 as JSON, or as server-sent events with ``stream``, /metrics as
  Prometheus text, and each error status the route can give with OpenAI's error body;
- the Bearer key when the server has one (not on /health/*);
- ``lora`` only on a server with --lora-dir, its names those of the folder's files when the
  document is built (a JSON string in multipart).

The limits come from the loaded folder: until the model is loaded the document is built
without them and not kept.
"""

from __future__ import annotations

import copy
import logging

from kolors_trt.runtime.spec import SHALLOW_UNET

from .protocol import INTERVAL_TEXT, EditParams, GenerationParams, size_pattern

logger = logging.getLogger(__name__)

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
IMAGES = {
    "type": "object", "required": ["created", "data", "output_format", "size", "parameters"],
    "properties": {"created": {"type": "integer"},
                   "data": {"type": "array", "items": {"type": "object", "required": ["b64_json"],
                                                       "properties": {"b64_json": {"type": "string"}}}},
                   "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
                   "size": {"type": "string"}, "parameters": {"type": "object"}},
}
REFERENCE = {
    "type": "object", "required": ["id", "object", "created", "cached"],
    "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "object": {"const": "reference"},
                   "created": {"type": "integer"}, "cached": {"type": "boolean"}},
}
MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"],
         "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                        "owned_by": {"type": "string"}}}
MODELS = {"type": "object", "required": ["object", "data"],
          "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL}}}
EVENT = {"type": "object", "required": ["data"],  # one server-sent event (OpenAPI 3.1: the schema is per event)
         "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
LORAS = {"type": "object", "required": ["object", "data"],
         "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
             "type": "object", "required": ["id", "object", "loaded"],
             "properties": {"id": {"type": "string"}, "object": {"const": "lora"}, "loaded": {"type": "boolean"}}}}}}
STATUS = {"type": "object", "required": ["ready", "state"],
          "properties": {"ready": {"type": "boolean"}, "state": {"type": "string"}}}
ERROR_TEXT = {400: "a field is invalid (the message names it and its range)", 401: "missing or wrong API key",
              404: "unknown model, reference_id or route; /v1/loras: no --lora-dir",
              413: "the body is over --max-body-mb",
              422: "the upload is no usable image", 429: "the queue is full (Retry-After)",
              500: "an engine failed (that request, or its batch)", 503: "not ready, or shutting down (Retry-After)",
              504: "past --timeout-s"}
WORK = (400, 404, 413, 429, 500, 503, 504)  # what a request that reaches the worker can get
ERRORS = {
    ("/v1/images/generations", "post"): WORK,
    ("/v1/images/edits", "post"): (*WORK, 422),
    ("/v1/references", "post"): (400, 413, 422, 429, 500, 503, 504),
    ("/v1/models", "get"): (503,),
    ("/v1/models/{model_id}", "get"): (404, 503),
    ("/v1/loras", "get"): (404, 503),
}
JSON_ANSWERS = {("/v1/images/generations", "post"): IMAGES, ("/v1/images/edits", "post"): IMAGES,
                ("/v1/references", "post"): REFERENCE, ("/v1/models", "get"): MODELS,
                ("/v1/models/{model_id}", "get"): MODEL, ("/v1/loras", "get"): LORAS, ("/health/ready", "get"): STATUS,
                ("/health/live", "get"): {"type": "object"}}
STREAMS = ("/v1/images/generations", "/v1/images/edits")


def json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def without_null(schema: dict) -> dict:
    """A property's schema with ``null`` taken out of anyOf (multipart fields are text: absent, never null)."""
    branches = [b for b in schema.get("anyOf", ()) if b.get("type") != "null"]
    if len(branches) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default") or (k == "default" and v is not None)}
    return {**rest, **branches[0]}


def narrow(schema: dict, config, folder, ceilings: dict, loras: list) -> dict:
    """A params schema with this server's limits (module docstring); ``loras``: the names `lora` may use."""
    props = schema["properties"]
    if config.lora_dir is None:
        props.pop("lora", None)
    elif "lora" in props:
        target = next(b for b in props["lora"].get("anyOf", [props["lora"]]) if b.get("type") == "object")
        weight = next(iter(target.pop("patternProperties").values()))
        if loras:
            target.update(propertyNames={"enum": loras}, additionalProperties=weight)
        else:
            target.update(maxProperties=0)
    for name in ("prompt", "negative_prompt"):
        target = props[name] if "type" in props[name] else next(b for b in props[name]["anyOf"] if b["type"] == "string")
        target["maxLength"] = config.max_prompt_chars
    steps = props["num_inference_steps"]
    next(b for b in steps.get("anyOf", [steps]) if b.get("type") == "integer")["maximum"] = config.max_steps
    if folder is not None:
        props["size"]["pattern"] = size_pattern(folder)
        props["n"]["maximum"] = min(props["n"]["maximum"], *ceilings.values())
        if SHALLOW_UNET not in folder.files:  # no DeepCache graph: interval 1 (off) only
            cache = props["deep_cache_interval"]
            next(b for b in cache.get("anyOf", [cache]) if b.get("type") == "integer")["maximum"] = 1
    return schema


def edit_form(config, folder, ceilings: dict, loras: list) -> dict:
    """The multipart body of /v1/images/edits."""
    schema = narrow(EditParams.model_json_schema(), config, folder, ceilings, loras)
    props = {name: without_null(p) for name, p in schema["properties"].items()}
    if "lora" in props:  # multipart fields are text: the object as JSON
        props["lora"] = {"type": "string", "contentMediaType": "application/json", "contentSchema": props["lora"],
                         "description": 'a JSON object {"adapter": weight}'}
    props["image"] = {"type": "string", "format": "binary", "description": "the IP-Adapter reference image"}
    props["guidance_interval"] = {"type": "string", "pattern": f"^{INTERVAL_TEXT.pattern.removesuffix(chr(92) + 'Z')}$",
                                  "description": "LOW:HIGH in sigma units, low < high: classifier-free guidance only "
                                                 "at steps whose sigma is in (LOW, HIGH]"}
    return {"type": "object", "required": ["image", *schema.get("required", ())], "properties": props}


def build(app, routes, config, worker) -> dict:
    """The document of ``app`` for this server; ``worker`` gives the folder and the batch ceilings once loaded."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=routes)
    folder = worker.pipe.folder if worker.pipe is not None and worker.ceilings else None
    loras = sorted(i["id"] for i in worker.pipe.lora.list()) if folder is not None and config.lora_dir else []
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # validation errors are answered 400 with ERROR
        schemas.pop(name, None)
    schemas["Error"] = ERROR
    generation = narrow(copy.deepcopy(schemas.get("GenerationParams") or GenerationParams.model_json_schema()),
                        config, folder, worker.ceilings, loras)
    generation["if"] = {"required": ["ip_adapter_scale"],
                        "properties": {"ip_adapter_scale": {"type": "number", "exclusiveMinimum": 0}}}
    generation["then"] = {"required": ["reference_id"], "properties": {"reference_id": {"type": "string"}}}
    schemas["GenerationParams"] = generation
    paths = doc["paths"]
    paths["/v1/images/edits"]["post"]["requestBody"] = {
        "required": True, "content": {"multipart/form-data": {"schema": edit_form(config, folder, worker.ceilings,
                                                                                  loras)}}}
    paths["/v1/references"]["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"], "additionalProperties": False,
        "properties": {"image": {"type": "string", "format": "binary"}}}}}}
    for path, methods in paths.items():
        for method, op in methods.items():
            if (path, method) in JSON_ANSWERS:
                answers = {"200": {"description": "OK", "content": json_content(JSON_ANSWERS[path, method])}}
            else:  # a route of its own kind (an HTML page, a new list): what FastAPI says of it
                answers = {"200": op.get("responses", {}).get("200", {"description": "OK"})}
            if path in STREAMS:
                answers["200"]["content"]["text/event-stream"] = {"schema": EVENT}
            if path == "/metrics":
                answers["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path.startswith("/health/"):
                answers["503"] = {"description": "not ready (live: the worker thread ended)",
                                  "content": json_content({"type": "object"})}
            statuses = ERRORS.get((path, method), ())
            if config.api_key is not None and not path.startswith("/health/"):
                statuses = (401, *statuses)
            for status in statuses:
                answers[str(status)] = {"description": ERROR_TEXT[status],
                                        "content": json_content({"$ref": "#/components/schemas/Error"})}
            op["responses"] = answers
            if config.api_key is not None:
                op["security"] = [] if path.startswith("/health/") else [{"bearer": []}]
    if config.api_key is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def openapi(app, config, worker):
    """``app.openapi``: the document, kept once the model is loaded (its limits are known then)."""
    def document() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build(app, app.routes, config, worker)
        if worker.ceilings:
            app.openapi_schema = doc
        return doc

    return document


__all__ = ["build", "openapi"]

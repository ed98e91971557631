"""The OpenAPI 3.0 description of the service's JSON API and ccache storage (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
ERROR: dict[str, Any] = {
    "description": "refused, with the reason",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
        }
    },
}
OUTPUT = {
    "type": "object",
    "required": ["name", "sha256", "size"],
    "properties": {
        "name": {"type": "string", "description": "relative path, e.g. bzImage, kbuild, patches/x.mbox"},
        "sha256": HEX64,
        "size": {"type": "integer", "minimum": 0},
        "kind": {"type": "string", "enum": ["file", "tar"]},
    },
}
MANIFEST = {
    "type": "object",
    "required": ["outputs"],
    "properties": {
        "outputs": {"type": "array", "items": OUTPUT, "minItems": 1},
        "inputs": {"type": "object", "additionalProperties": {"type": "string"}},
        "metadata": {"type": "object"},
    },
}
UNAVAILABLE = {
    "description": "retry later: a store unreachable, too many miss explanations at once (with Retry-After),"
    " or the server's connection limit reached (plain text, from the HTTP server itself)",
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds, when busy"}},
    "content": {**ERROR["content"], "text/plain": {"schema": {"type": "string"}}},
}
FULL = {**ERROR, "description": "the blob store or the index is out of space: try later"}
WRITES = {"put", "post", "delete"}
READ_ONLY_WRITES = {("/api/v1/missing-blobs", "post")}  # a query with a body: writes nothing
REF = {
    "type": "object",
    "required": ["sha256", "size"],
    "properties": {"sha256": HEX64, "size": {"type": "integer"}},
}


def _param(name: str, schema: dict[str, Any], where: str = "path") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """A required JSON request body of that schema."""
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): ERROR for code in codes}


KEY = _param("key", HEX64)
DIGEST = _param("digest", HEX64)
SECURE: list[dict[str, list[str]]] = [{"bearer": []}, {"basic": []}]


def openapi_schema() -> dict[str, Any]:
    return _with_unavailable(_schema())


def _with_unavailable(doc: dict[str, Any]) -> dict[str, Any]:
    """Every operation may answer 503 (a store down, busy); every write may answer 507 (a store full)."""
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            responses.setdefault("503", UNAVAILABLE)
            if method in WRITES and (path, method) not in READ_ONLY_WRITES:
                responses.setdefault("507", FULL)
    return doc


OCTETS = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def _schema() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kernel-ci build cache",
            "version": "1",
            "description": "Content-addressed build outputs, a build index, ccache HTTP remote storage. "
            "Upload every blob, then PUT the manifest (refused while a blob is missing).",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "any user name, the token as password",
                },
            }
        },
        "paths": {
            **_health_paths(),
            **_blob_paths(),
            **_build_paths(),
            **_alias_paths(),
            **_ccache_paths(),
        },
    }


def _health_paths() -> dict[str, Any]:
    """/healthz and /metrics."""
    return {
        "/healthz": {"get": {"responses": {"200": _json("healthy"), "503": _json("index unusable")}}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format"}}}},
    }


def _blob_paths() -> dict[str, Any]:
    """Blobs by sha256, and the missing-blobs query."""
    return {
        "/api/v1/blobs/{digest}": {
            "parameters": [DIGEST],
            "get": {
                "responses": {
                    "200": {"description": "the bytes", "content": OCTETS},
                    **_errors(400, 401, 404),
                }
            },
            "head": {"responses": {"200": {"description": "present"}, "404": {"description": "absent"}}},
            "put": {
                "security": SECURE,
                "requestBody": {"required": True, "content": OCTETS},
                "responses": {
                    "200": _json("already stored"),
                    "201": _json("stored"),
                    **_errors(400, 401, 403, 411, 413, 422, 507),
                },
            },
        },
        "/api/v1/missing-blobs": {
            "post": {
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "required": ["digests"],
                        "properties": {"digests": {"type": "array", "items": HEX64}},
                    }
                ),
                "responses": {"200": _json("the digests not stored"), **_errors(400, 401)},
            }
        },
    }


def _build_paths() -> dict[str, Any]:
    """Builds: manifests, pins, the miss explanation, attached runs, files."""
    return {
        "/api/v1/builds": {
            "get": {
                "parameters": [
                    _param("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "query"),
                    _param("offset", {"type": "integer", "minimum": 0}, "query"),
                ],
                "responses": {"200": _json("builds, newest first"), **_errors(400, 401)},
            }
        },
        "/api/v1/builds/{key}": {
            "parameters": [KEY],
            "get": {"responses": {"200": _json("the manifest"), **_errors(400, 401, 404)}},
            "head": {"responses": {"200": {"description": "complete"}, "404": {"description": "absent"}}},
            "put": {
                "security": SECURE,
                "requestBody": _json_body(MANIFEST),
                "responses": {
                    "200": _json("a complete entry existed: kept"),
                    "201": _json("published"),
                    **_errors(400, 401, 403, 409, 413, 422),
                },
            },
        },
        "/api/v1/builds/{key}/pin": {
            "parameters": [KEY],
            "put": {
                "security": SECURE,
                "responses": {"200": _json("pinned"), **_errors(400, 401, 403, 404)},
            },
            "delete": {
                "security": SECURE,
                "responses": {"200": _json("unpinned"), **_errors(400, 401, 403, 404)},
            },
        },
        "/api/v1/builds/{key}/miss": {
            "parameters": [KEY],
            "get": {
                "responses": {
                    "200": _json("input diff against the nearest build"),
                    **_errors(400, 401, 404),
                }
            },
        },
        "/api/v1/builds/{key}/runs/{run_id}": {
            "parameters": [
                KEY,
                _param("run_id", {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}),
            ],
            "put": {
                "security": SECURE,
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "properties": {
                            "junit": REF,
                            "console": REF,
                            "outcome": {"type": "string"},
                        },
                    }
                ),
                "responses": {
                    "200": _json("replaced"),
                    "201": _json("attached"),
                    **_errors(400, 401, 403, 404, 409),
                },
            },
        },
        "/api/v1/builds/{key}/runs/{run_id}/{part}": {
            "parameters": [
                KEY,
                _param("run_id", {"type": "string"}),
                _param("part", {"type": "string", "enum": ["junit.xml", "console.log"]}),
            ],
            "get": {"responses": {"200": {"description": "the file"}, **_errors(400, 401, 404)}},
        },
        "/api/v1/builds/{key}/files/{name}": {
            "parameters": [KEY, _param("name", {"type": "string"})],
            "get": {
                "responses": {
                    "200": {"description": "the output", "content": OCTETS},
                    **_errors(400, 401, 404),
                }
            },
        },
    }


def _alias_paths() -> dict[str, Any]:
    """Request key -> build key."""
    return {
        "/api/v1/aliases/{request_key}": {
            "parameters": [_param("request_key", HEX64)],
            "get": {"responses": {"200": _json("the build key"), **_errors(400, 401, 404)}},
            "put": {
                "security": SECURE,
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "required": ["key"],
                        "properties": {"key": HEX64},
                    }
                ),
                "responses": {"200": _json("stored"), **_errors(400, 401, 403, 413)},
            },
        },
    }


def _ccache_paths() -> dict[str, Any]:
    """Ccache's HTTP remote storage."""
    return {
        "/ccache/{path}": {
            "parameters": [_param("path", {"type": "string"})],
            "get": {
                "responses": {
                    "200": {"description": "hit", "content": OCTETS},
                    "404": {"description": "miss"},
                }
            },
            "head": {"responses": {"200": {"description": "present"}, "404": {"description": "absent"}}},
            "put": {
                "security": SECURE,
                "requestBody": {"required": True, "content": OCTETS},
                "responses": {"201": {"description": "stored"}, **_errors(401, 403, 404, 413, 507)},
            },
            "delete": {
                "security": SECURE,
                "responses": {"200": {"description": "deleted"}, "404": {"description": "absent"}},
            },
        },
    }

"""The OpenAPI 3.1 description of the worker's HTTP API (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_SCHEMES = {
    "type": "object",
    "description": "scheme -> segment -> customers",
    "additionalProperties": _COUNTS,
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "500": {"$ref": "#/components/responses/Internal"},
}

_INTERVAL = {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2,
             "maxItems": 2, "description": "95% Wilson interval of the rate"}
_ACTION_ROW = _obj(
    ["action_id", "segment", "treated_exposed", "treated_converted", "holdout_exposed",
     "holdout_converted", "treated_rate", "holdout_rate", "uplift", "relative_lift", "p_value"],
    action_id=_STR,
    segment=_STR,
    treated_exposed=_INT,
    treated_converted=_INT,
    holdout_exposed=_INT,
    holdout_converted=_INT,
    treated_rate=_NUM_OR_NULL,
    holdout_rate=_NUM_OR_NULL,
    uplift={**_NUM_OR_NULL, "description": "treated rate minus holdout rate"},
    relative_lift={**_NUM_OR_NULL, "description": "treated rate / holdout rate - 1"},
    p_value={**_NUM_OR_NULL, "description": "two-proportion z-test, treated vs holdout"},
    treated_ci=_INTERVAL,
    holdout_ci=_INTERVAL,
)
_MIGRATION = {
    **_obj(
        ["migration_id", "customer_id", "scheme", "from_segment", "to_segment", "at"],
        migration_id=_STR,
        customer_id=_STR,
        scheme=_STR,
        from_segment={**_STR_OR_NULL, "description": "null for a customer's first segment"},
        to_segment=_STR,
        at={**_STR, "description": "event time of the migration (RFC 3339)"},
        emitted_at=_STR,
        reason=_STR,
        features={"type": "object"},
        scores={"type": "object"},
        rules_version=_STR,
        model_versions={"type": "object"},
        action={
            "oneOf": [
                {"type": "null"},
                _obj(["action_id", "holdout"], action_id=_STR, channel=_STR,
                     holdout={"type": "boolean"}),
            ]
        },
    ),
    "description": "A segment-migration event, as on the segment-migrations topic.",
}
_CUSTOMER = _obj(
    ["customer_id", "features", "scores", "segments", "history"],
    customer_id=_STR,
    as_of={"type": ["string", "integer", "null"], "description": "engine event time"},
    features={"type": "object", "description": "feature name -> value (DESIGN section 4)"},
    scores={"type": "object", "description": "score name -> value (DESIGN section 5)"},
    segments={"type": "object", "additionalProperties": _STR,
              "description": "scheme -> current segment"},
    history={"type": "array", "items": {"type": "object"},
             "description": "the customer's migrations, oldest first"},
    segments_since={"type": "object", "additionalProperties": _STR,
                    "description": "scheme -> engine time the customer entered the segment"},
    model_versions={"type": "object", "additionalProperties": {"type": "integer"},
                    "description": "model -> version the scores came from"},
)
_THROUGHPUT_POINT = _obj(
    ["t", "events_in_per_s", "migrations_per_s", "dlq_per_s", "lag"],
    t={**_INT, "description": "wall clock, epoch milliseconds"},
    events_in_per_s=_NUM,
    migrations_per_s=_NUM,
    dlq_per_s=_NUM,
    lag=_INT,
)
_MODEL = _obj(
    ["model", "auc", "log_loss", "examples", "drift_alarms"],
    model=_STR,
    version={"type": ["string", "integer", "null"]},
    auc=_NUM_OR_NULL,
    log_loss=_NUM_OR_NULL,
    examples=_INT,
    drift_alarms=_INT,
    history={"type": "array", "items": _obj(["t"], t=_INT, auc=_NUM_OR_NULL,
                                            log_loss=_NUM_OR_NULL)},
)
_STATS = _obj(
    ["throughput", "lag", "segments", "segment_history", "flows", "models", "actions"],
    as_of=_STR_OR_NULL,
    generated_at=_STR,
    throughput={"type": "array", "items": _THROUGHPUT_POINT},
    lag=_obj(["total", "partitions"], total=_INT, partitions={
        "type": "array",
        "items": _obj(["topic", "partition", "lag"], topic=_STR, partition=_INT, lag=_INT),
    }),
    segments=_SCHEMES,
    segment_history={"type": "object", "additionalProperties": {
        "type": "array", "items": _obj(["t", "sizes"], t=_INT, sizes=_COUNTS)}},
    flows={"type": "object", "additionalProperties": {
        "type": "array",
        "items": _obj(["from", "to", "count"], to=_STR, count=_INT,
                      **{"from": _STR_OR_NULL}),
    }},
    models={"type": "array", "items": _ref("ModelQuality")},
    actions={"type": "array", "items": _ref("ActionResult")},
)


def _get(summary: str, response: dict[str, Any], *, public: bool = False,
         **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": response, **_ERRORS}}
    if public:
        op["security"] = [{}]
        op["responses"].pop("401")
    op.update(extra)
    return {"get": op}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "segstream",
        "version": "1",
        "description": (
            "Real-time customer segmentation: customers, segments, migrations, action lift, "
            "health and metrics of one worker. When the worker has an API token "
            "(SEGSTREAM_API_TOKEN), every route except /healthz, /readyz and the dashboard "
            "page needs `Authorization: Bearer <token>`."
        ),
    },
    "security": [{}, {"bearerAuth": []}],
    "paths": {
        "/customers/{customer_id}": {
            **_get(
                "A customer's features, scores, segments and migration history",
                _json(_ref("Customer"), "the customer"),
            ),
            "parameters": [{"name": "customer_id", "in": "path", "required": True,
                            "schema": _STR}],
        },
        "/segments": _get("Customers per segment, per scheme",
                          _json(_ref("Segments"), "segment sizes")),
        "/migrations": _get(
            "Recent segment migrations, oldest first, paged by cursor",
            _json(_ref("MigrationPage"), "a page of migrations"),
            parameters=[
                {"name": "since", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]{1,20}(-[0-9]{1,20})?$"},
                 "description": "the `next` cursor of the previous page (`<ms>-<seq>`), "
                                "or `<ms>` alone: after every entry of that millisecond "
                                "(of the log's clock); anything else is a 400"},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
            ],
        ),
        "/actions": _get("Treated vs holdout results and lift per action and segment",
                         _json(_ref("Actions"), "action results")),
        "/healthz": _get("Liveness", _json(_ref("Health"), "the worker process is up"),
                         public=True),
        "/readyz": _get(
            "Readiness: Kafka and Redis reachable, partitions assigned, commits and "
            "publishes not failing for 30 s",
            _json(_ref("Ready"), "ready"),
            public=True,
        ),
        "/metrics": _get("Prometheus metrics", {
            "description": "Prometheus text exposition format 0.0.4",
            "content": {"text/plain": {"schema": _STR}},
        }),
        "/openapi.json": _get("This document", _json({"type": "object"}, "OpenAPI 3.1")),
        "/api/stats": _get("What the dashboard plots",
                           _json(_ref("Stats"), "throughput, lag, segments, flows, models")),
        "/": _get("The live dashboard (HTML; pass ?token= once when a token is set)", {
            "description": "the dashboard page",
            "content": {"text/html": {"schema": _STR}},
        }, public=True),
    },
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        "responses": {
            "Unauthorized": _json(_ref("Error"), "missing or invalid bearer token"),
            "NotFound": _json(_ref("Error"), "unknown resource"),
            "BadRequest": _json(_ref("Error"), "invalid parameter"),
            "NotReady": _json(_ref("Ready"), "not ready"),
            "Internal": _json(_ref("Error"), "internal error"),
            "Unavailable": {**_json(_ref("Error"), "the store did not answer; retry later"),
                            "headers": {"Retry-After": {
                                "description": "seconds to wait", "schema": _INT}}},
        },
        "schemas": {
            "Error": _obj(["error"], error=_STR),
            "Customer": _CUSTOMER,
            "Segments": _obj(["as_of", "schemes"], as_of={"type": ["string", "integer", "null"]},
                             schemes=_SCHEMES),
            "Migration": _MIGRATION,
            "MigrationPage": _obj(["migrations", "next"],
                                  migrations={"type": "array", "items": _ref("Migration")},
                                  next=_STR_OR_NULL),
            "ActionResult": _ACTION_ROW,
            "Actions": _obj(["as_of", "actions"], as_of={"type": ["string", "integer", "null"]},
                            actions={"type": "array", "items": _ref("ActionResult")}),
            "Health": _obj(["status"], status={"const": "ok"}),
            "Ready": _obj(["ready"], ready={"type": "boolean"}),
            "ModelQuality": _MODEL,
            "Stats": _STATS,
        },
    },
}

OPENAPI["paths"]["/dashboard"] = OPENAPI["paths"]["/"]
OPENAPI["paths"]["/customers/{customer_id}"]["get"]["responses"]["404"] = {
    "$ref": "#/components/responses/NotFound"
}
for _path in ("/customers/{customer_id}", "/segments", "/migrations", "/actions"):
    OPENAPI["paths"][_path]["get"]["responses"]["503"] = {
        "$ref": "#/components/responses/Unavailable"
    }
OPENAPI["paths"]["/customers/{customer_id}"]["get"]["responses"]["400"] = {
    "$ref": "#/components/responses/BadRequest"  # an id that is not percent-encoded UTF-8
}
OPENAPI["paths"]["/migrations"]["get"]["responses"]["400"] = {
    "$ref": "#/components/responses/BadRequest"
}
OPENAPI["paths"]["/readyz"]["get"]["responses"]["503"] = {
    "$ref": "#/components/responses/NotReady"
}

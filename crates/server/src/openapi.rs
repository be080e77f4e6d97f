//! The OpenAPI 3.1 description served at `/openapi.json`, written out by hand
//! next to the routes it describes (`api.rs`).

use serde_json::{json, Value};

fn param(name: &str, place: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": place, "required": place == "path", "description": description, "schema": schema})
}

fn errors(codes: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for code in codes {
        let what = match *code {
            "400" => "invalid input; `message` names the field",
            "404" => "the stream does not exist",
            "409" => "`wrong_expected_version` (with `actual_version`), `append_condition_failed` (with `first_conflict`) or `idempotency_conflict`",
            "410" => "the stream was deleted for good",
            "413" => "the event, the append or the body is over its limit",
            _ => "error",
        };
        out.insert(code.to_string(), json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    Value::Object(out)
}

fn ok(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

pub fn document() -> Value {
    let stream = param("stream", "path", "stream name (1–256 bytes, not starting with '$' except the writable system families)", json!({"type": "string"}));
    let limit = param("limit", "query", "most events returned (default 1000)", json!({"type": "integer", "minimum": 0}));
    let direction = param("direction", "query", "forward (default) or backward", json!({"enum": ["forward", "backward"]}));
    let from_pos = param("from", "query", "first position, inclusive", json!({"type": "integer", "minimum": 0}));
    let after_pos = param("after", "query", "start just past this position (paging)", json!({"type": "integer", "minimum": 0}));
    let sub_from = param("from", "query", "start or end (only new events)", json!({"enum": ["start", "end"]}));
    let sub_after = param("after", "query", "deliver events strictly after this version (stream) or position ($all); the Last-Event-ID header wins", json!({"type": "integer"}));
    let token = param("access_token", "query", "the API key, for clients that cannot send headers (EventSource)", json!({"type": "string"}));
    let mut append_errors = errors(&["400", "409", "410", "413"]);
    append_errors["200"] = ok("appended and durable", "AppendResult");
    let mut read_errors = errors(&["400", "404", "410"]);
    read_errors["200"] = ok("the events", "Events");
    let sse = json!({"200": {"description": "Server-Sent Events: `event: event` frames (data: an Event, id: version or position), `event: error` then the end if the store fails", "content": {"text/event-stream": {}}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Cairn", "version": env!("CARGO_PKG_VERSION"), "description": "The Cairn event store over HTTP. Errors are {\"error\": code, \"message\": text, ...fields}. With API keys, send Authorization: Bearer <key>."},
        "security": [{"apiKey": []}, {}],
        "paths": {
            "/streams/{stream}": {
                "post": {"summary": "Append events atomically", "parameters": [stream],
                         "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AppendRequest"}}}},
                         "responses": append_errors},
                "get": {"summary": "Read a stream", "parameters": [stream, param("from", "query", "first version (default 1, or the newest backward)", json!({"type": "integer", "minimum": 0})), limit, direction], "responses": read_errors},
                "delete": {"summary": "Delete a stream (soft, or hard=true for a tombstone)", "parameters": [stream, param("expected_version", "query", "any, no_stream, exists or a version", json!({"type": "string"})), param("hard", "query", "tombstone", json!({"type": "boolean"}))], "responses": {"200": ok("deleted", "AppendResult")}}
            },
            "/streams": {"get": {"summary": "List streams", "parameters": [param("prefix", "query", "name prefix", json!({"type": "string"})), limit], "responses": {"200": {"description": "{\"streams\": [StreamInfo]}"}}}},
            "/streams/{stream}/info": {"get": {"summary": "A stream's version, state and metadata", "parameters": [stream], "responses": {"200": ok("the stream", "StreamInfo")}}},
            "/streams/{stream}/metadata": {
                "get": {"summary": "A stream's metadata", "parameters": [stream], "responses": {"200": ok("metadata", "StreamMetadata")}},
                "put": {"summary": "Replace a stream's metadata", "parameters": [stream], "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/StreamMetadata"}}}}, "responses": {"200": ok("stored", "AppendResult")}}
            },
            "/streams/{stream}/subscribe": {"get": {"summary": "Follow a stream live (history first)", "parameters": [stream, sub_from, sub_after, token.clone()], "responses": sse}},
            "/all": {"get": {"summary": "Read every event in global order", "parameters": [from_pos, after_pos, limit, direction], "responses": {"200": ok("the events", "Events")}}},
            "/all/subscribe": {"get": {"summary": "Follow $all, a category, event types or a query live", "parameters": [sub_from, sub_after,
                param("category", "query", "streams named <category>-…", json!({"type": "string"})),
                param("type", "query", "event types, comma-separated", json!({"type": "string"})),
                param("query", "query", "a Query as JSON", json!({"type": "string"})), token], "responses": sse}},
            "/query": {"post": {"summary": "Read the events matching a query (tags, types, categories)", "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/QueryRequest"}}}}, "responses": {"200": ok("the events", "Events")}}},
            "/groups": {"get": {"summary": "Consumer groups stored in the store, with checkpoint, lag and parked count", "responses": {"200": {"description": "{\"groups\": [...]}"}}}},
            "/head": {"get": {"summary": "Where the next event goes, and the newest event's position", "responses": {"200": {"description": "{\"head\": n, \"last\": n|null}"}}}},
            "/health": {"get": {"summary": "Liveness and readiness", "responses": {"200": {"description": "ready"}, "503": {"description": "the store is unavailable"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format 0.0.4", "content": {"text/plain": {}}}}}}
        },
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "a key from `cairn keys add`; required when the server has keys"}}, "schemas": {
            "AppendRequest": {"type": "object", "additionalProperties": false, "required": ["events"], "properties": {
                "expected_version": {"oneOf": [{"enum": ["any", "no_stream", "exists"]}, {"type": "integer", "minimum": 0}]},
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/NewEvent"}},
                "condition": {"type": "object", "properties": {"fail_if_events_match": {"$ref": "#/components/schemas/Query"}, "after": {"type": "integer"}}}}},
            "NewEvent": {"type": "object", "additionalProperties": false, "required": ["type", "data"], "properties": {
                "id": {"type": "string", "format": "uuid"}, "type": {"type": "string"}, "data": {},
                "content_type": {"enum": ["json", "binary"]}, "metadata": {"type": "object"},
                "schema_version": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}},
            "Event": {"type": "object", "properties": {
                "id": {"type": "string", "format": "uuid"}, "stream": {"type": "string"}, "type": {"type": "string"},
                "version": {"type": "integer"}, "position": {"type": "integer"}, "timestamp": {"type": "string", "format": "date-time"},
                "schema_version": {"type": "integer"}, "content_type": {"enum": ["json", "binary"]}, "data": {}, "metadata": {"type": "object"},
                "tags": {"type": "array", "items": {"type": "string"}}}},
            "Events": {"type": "object", "properties": {"events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}},
            "AppendResult": {"type": "object", "properties": {"next_version": {"type": "integer"}, "position": {"type": "integer"}}},
            "StreamInfo": {"type": "object", "properties": {"stream": {"type": "string"}, "version": {"type": "integer"}, "state": {"enum": ["live", "deleted", "tombstoned"]}, "metadata": {"$ref": "#/components/schemas/StreamMetadata"}, "last_position": {"type": "integer"}}},
            "StreamMetadata": {"type": "object", "additionalProperties": false, "properties": {"max_age_secs": {"type": "integer"}, "max_count": {"type": "integer"}, "truncate_before": {"type": "integer"}}},
            "Query": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
                "types": {"type": "array", "items": {"type": "string"}}, "tags": {"type": "array", "items": {"type": "string"}}, "categories": {"type": "array", "items": {"type": "string"}}}}}}},
            "QueryRequest": {"type": "object", "additionalProperties": false, "required": ["query"], "properties": {
                "query": {"$ref": "#/components/schemas/Query"}, "from": {"type": "integer"}, "after": {"type": "integer"}, "limit": {"type": "integer"}, "direction": {"enum": ["forward", "backward"]}}},
            "Error": {"type": "object", "required": ["error", "message"], "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}
        }}
    })
}

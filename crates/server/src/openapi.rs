//! The OpenAPI 3.1 description served at `/openapi.json`, written out by hand
//! next to the routes it describes (`api.rs`). It says what the server
//! takes and answers as exactly as JSON Schema can, so that a fuzzer
//! (Schemathesis, in the tests) can hold the two to each other: what the
//! schemas allow is accepted, what they refuse is refused. Lengths are
//! counted in characters here and in UTF-8 bytes by the server.

use cairn_core::{
    Limits, QUERY_ITEM_TERMS_MAX, QUERY_ITEMS_MAX, STREAM_NAME_BYTES_MAX, TAG_BYTES_MAX,
};
use cairn_wire::{EVENTS_PAGE_MAX, STREAMS_PAGE_MAX};
use serde_json::{Value, json};

fn param(name: &str, place: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": place, "required": place == "path", "description": description, "schema": schema})
}

/// Characters no name may hold: control characters, and the invisible and
/// bidi-control ones (`cairn_core`'s `is_invisible_char`), as a regex class body.
const NOT_IN_NAMES: &str = "\\x00-\\x1F\\x7F-\\x9F\\u00AD\\u0600-\\u0605\\u061C\\u06DD\\u070F\\u0890\\u0891\\u08E2\\u180E\\u200B-\\u200F\\u2028-\\u202E\\u2060-\\u2064\\u2066-\\u206F\\uFEFF\\uFFF9-\\uFFFB\u{110BD}\u{110CD}\u{13430}-\u{1343F}\u{1BCA0}-\u{1BCA3}\u{1D173}-\u{1D17A}\u{E0001}\u{E0020}-\u{E007F}";

fn name_pattern(first_not: &str, rest_not: &str, max: usize) -> String {
    format!("^[^{first_not}{NOT_IN_NAMES}][^{rest_not}{NOT_IN_NAMES}]{{0,{}}}$", max - 1)
}

/// A whole number from 0 to `u64::MAX`.
fn u64_schema() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})
}

fn nullable(mut schema: Value) -> Value {
    schema["type"] = json!([schema["type"].clone(), "null"]);
    schema
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// The error answers of an endpoint: those of `codes`, plus what any API
/// endpoint can answer (a bad parameter, access, a body over the limit,
/// rate of failed logins, a failing or busy store).
fn errors(codes: &[&str]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for code in ["400", "401", "403", "413", "429", "500", "503"].iter().chain(codes) {
        let what = match *code {
            "400" => {
                "invalid input (`invalid_request`, `invalid_event`, `invalid_stream_name`, `invalid_argument`); `message` names the field"
            }
            "401" => {
                "`unauthorized`: no key, or not a key this server knows (with `WWW-Authenticate: Bearer`)"
            }
            "403" => {
                "`forbidden`: the key does not allow this (a read-only key, or another stream prefix)"
            }
            "404" => {
                "`stream_not_found`, `invalid_position` (no event at that position), or `not_found` (no such saga or process instance)"
            }
            "409" => {
                "`wrong_expected_version` (with `actual_version`), `append_condition_failed` (with `first_conflict`) or `idempotency_conflict`"
            }
            "410" => "`stream_deleted`: the stream was deleted for good (tombstoned)",
            "413" => {
                "`event_too_large`, `append_too_large`, or `body_too_large` (the request body is over the server's limit)"
            }
            "429" => "`too_many_failed_logins` from this address; wait a minute",
            "500" => "`corrupt`, `io` or `locked`: the store failed",
            "503" => {
                "`busy`, `closed` or `outcome_unknown` (the append may have been written: retry with the same event ids); `retryable: true`"
            }
            _ => "error",
        };
        let mut response = error_response(what);
        if *code == "401" {
            response["headers"] = json!({"WWW-Authenticate": {"schema": {"type": "string"}}});
        }
        if *code == "503" {
            response["headers"] = json!({"Retry-After": {"schema": {"type": "string"}}});
        }
        out.insert(code.to_string(), response);
    }
    out
}

fn with_links(mut response: Value, links: Value) -> Value {
    response["links"] = links;
    response
}

fn ok(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// An operation's responses: 200 with `success`, and `errors`.
fn responses(success: Value, codes: &[&str]) -> Value {
    let mut out = errors(codes);
    out.insert("200".into(), success);
    Value::Object(out)
}

/// Links from an append to what can be done with its stream next (which
/// lets a stateful fuzzer go on from what it wrote). Not to its info and
/// metadata: those still answer once the stream is deleted (its state says
/// so), which a fuzzer would take for a deleted resource still served.
fn stream_links() -> Value {
    let to =
        |op: &str| json!({"operationId": op, "parameters": {"stream": "$request.path.stream"}});
    json!({"ReadStream": to("readStream"), "SetMetadata": to("setMetadata"), "DeleteStream": to("deleteStream"), "AppendAgain": to("append")})
}

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

pub(crate) fn document() -> Value {
    let prefixes: Vec<&str> = cairn_core::WRITABLE_SYSTEM_PREFIXES
        .iter()
        .map(|p| p.trim_start_matches('$').trim_end_matches('-'))
        .collect();
    // Writes: a user name, or a writable system family's prefix(es) before one.
    let write_name = format!(
        "^(?:\\$(?:{})-)*{}",
        prefixes.join("|"),
        &name_pattern("$", "", STREAM_NAME_BYTES_MAX)[1..]
    );
    let stream_write = param(
        "stream",
        "path",
        &format!(
            "stream name: 1 to {STREAM_NAME_BYTES_MAX} bytes, no control, invisible or bidi-control characters, not starting with '$' except after the prefix of a writable system family ({})",
            cairn_core::WRITABLE_SYSTEM_PREFIXES.join(", ")
        ),
        json!({"type": "string", "pattern": write_name}),
    );
    // Reads take any name (system streams too); one that was never written is a 404.
    let stream_read = param(
        "stream",
        "path",
        "stream name, system streams ($…) too",
        json!({"type": "string", "minLength": 1, "maxLength": STREAM_NAME_BYTES_MAX + 2}),
    );
    let limit = |max: usize, what: &str| {
        param(
            "limit",
            "query",
            &format!("most {what} returned (default 1000; a larger limit is lowered to {max})"),
            json!({"type": "integer", "minimum": 0}),
        )
    };
    let direction = param(
        "direction",
        "query",
        "forward (default) or backward",
        json!({"enum": ["forward", "backward"]}),
    );
    // `from` (inclusive) or `after` (exclusive), not both: one object parameter so the schema can say so.
    let position_window = json!({
        "name": "window", "in": "query", "style": "form", "explode": true,
        "description": "`from`: first position, inclusive (0 for the start); `after`: start just past this position (the previous page's `next`); not both",
        "schema": {"type": "object", "additionalProperties": false,
                   "properties": {"from": u64_schema(), "after": u64_schema()},
                   "not": {"required": ["from", "after"]}}
    });
    let sub_from = param(
        "from",
        "query",
        "start (the default) or end (only new events)",
        json!({"enum": ["start", "end"]}),
    );
    let sub_after = param(
        "after",
        "query",
        "deliver events strictly after this version (stream) or position ($all); the Last-Event-ID header wins; not with from",
        u64_schema(),
    );
    let last_id = param(
        "Last-Event-ID",
        "header",
        "the id of the last event seen (a reconnecting EventSource sends it)",
        u64_schema(),
    );
    let token = param(
        "access_token",
        "query",
        "the API key, for clients that cannot send headers (EventSource); refused on other endpoints",
        json!({"type": "string"}),
    );
    let sse = json!({"description": "Server-Sent Events: `event: event` frames (data: an Event, id: version or position), `event: error` then the end if the store fails", "content": {"text/event-stream": {"schema": {"type": "string"}}}});
    let expected = json!({"anyOf": [
        {"enum": ["any", "no_stream", "no-stream", "exists", "stream_exists"]},
        {"type": "string", "pattern": "^[0-9]{1,19}$"},
        u64_schema()
    ]});
    let nil = "00000000-0000-0000-0000-000000000000";
    let uuid = json!({"type": "string", "format": "uuid", "not": {"const": nil}});
    let meta_id = json!({"type": ["string", "null"], "format": "uuid"});
    let tag = json!({"type": "string", "pattern": name_pattern("", "", TAG_BYTES_MAX)});
    let event_type_max = Limits::default().event_type_bytes_max;
    let terms =
        |item: Value| json!({"type": "array", "maxItems": QUERY_ITEM_TERMS_MAX, "items": item});
    // The standard alphabet with padding, and the unused bits of the last symbol zero.
    let base64 =
        "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";
    let limits = Limits::default();
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Cairn", "version": env!("CARGO_PKG_VERSION"), "description": format!(
            "The Cairn event store over HTTP. Errors are {{\"error\": code, \"message\": text, ...fields}}. With API keys, send Authorization: Bearer <key>. \
             Reads return at most {EVENTS_PAGE_MAX} events (GET /streams: {STREAMS_PAGE_MAX} streams); a full page has `next`, where the following one starts. \
             Lengths are limits in UTF-8 bytes; JSON payloads nest at most {} levels and hold no lone surrogate escapes.", limits.json_depth_max)},
        "security": [{"apiKey": []}, {}],
        "paths": {
            "/streams/{stream}": {
                "post": {"operationId": "append", "summary": "Append events atomically", "parameters": [stream_write.clone()], "requestBody": body("AppendRequest"),
                         "responses": responses(with_links(ok("appended and durable", "AppendResult"), stream_links()), &["409", "410"])},
                "get": {"operationId": "readStream", "summary": "Read a stream", "parameters": [stream_read.clone(),
                            param("from", "query", "first version (default 1, or the newest backward)", u64_schema()), limit(EVENTS_PAGE_MAX, "events"), direction.clone()],
                        "responses": responses(ok("the events; `next` is {\"from\": version} when the page is full", "Events"), &["404", "410"])},
                "delete": {"operationId": "deleteStream", "summary": "Delete a stream (soft, or hard=true for a tombstone)", "parameters": [stream_write.clone(),
                               param("expected_version", "query", "any (the default), no_stream, exists or a version", json!({"anyOf": [
                                   {"enum": ["any", "no_stream", "no-stream", "exists", "stream_exists"]}, u64_schema()]})),
                               param("hard", "query", "tombstone: the name can never be written again", json!({"type": "boolean"}))],
                           "responses": responses(ok("deleted", "AppendResult"), &["404", "409", "410"])}
            },
            "/appends": {"post": {"operationId": "appendEach", "summary": "Several appends, each atomic and on its own, in order, sharing fsyncs: NDJSON, a line {stream, expected_version?, events, condition?} per append (at most 10,000)",
                                  "requestBody": {"required": true, "description": "NDJSON (sent as application/x-ndjson or text/plain: the type is not checked)", "content": {"text/plain": {"schema": {"type": "string", "minLength": 1}}}},
                                  "responses": responses(json!({"description": "NDJSON, a line per append in order: its AppendResult, or the error body it would have had alone",
                                                                "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}), &["400"])}},
            "/streams": {"get": {"operationId": "listStreams", "summary": "List streams by name", "parameters": [param("prefix", "query", "name prefix ('$' lists system streams)", json!({"type": "string"})), limit(STREAMS_PAGE_MAX, "streams")],
                                 "responses": responses(ok("the streams; `truncated` when there may be more", "Streams"), &[])}},
            "/streams/{stream}/info": {"get": {"operationId": "streamInfo", "summary": "A stream's version, state and metadata (a deleted stream's too: its state says so)", "parameters": [stream_read.clone()],
                                               "responses": responses(ok("the stream", "StreamInfo"), &["404", "410"])}},
            "/streams/{stream}/metadata": {
                "get": {"operationId": "getMetadata", "summary": "A stream's metadata", "parameters": [stream_read.clone()], "responses": responses(ok("metadata", "StreamMetadata"), &["404", "410"])},
                "put": {"operationId": "setMetadata", "summary": "Replace a stream's metadata", "parameters": [stream_write], "requestBody": body("StreamMetadata"),
                        "responses": responses(ok("stored", "AppendResult"), &["404", "409", "410"])}
            },
            "/streams/{stream}/subscribe": {"get": {"operationId": "subscribeStream", "summary": "Follow a stream live (history first)", "parameters": [stream_read, sub_from.clone(), sub_after.clone(), last_id.clone(), token.clone()],
                                                    "responses": responses(sse.clone(), &["404", "410"])}},
            "/all": {"get": {"operationId": "readAll", "summary": "Read every event in global order", "parameters": [position_window, limit(EVENTS_PAGE_MAX, "events"), direction],
                             "responses": responses(ok("the events; `next` is {\"after\": position} when the page is full", "Events"), &["404"])}},
            "/all/subscribe": {"get": {"operationId": "subscribeAll", "summary": "Follow $all, a category, event types or a query live", "parameters": [sub_from, sub_after, last_id,
                param("category", "query", "streams named <category>-…", json!({"type": "string"})),
                param("type", "query", "event types, comma-separated", json!({"type": "string"})),
                param("query", "query", "a Query as JSON (not with category or type)", json!({"type": "string"})), token], "responses": responses(sse, &["404"])}},
            "/query": {"post": {"operationId": "readQuery", "summary": "Read the events matching a query (tags, types, categories)", "requestBody": body("QueryRequest"),
                                "responses": responses(ok("the events; `next` is {\"after\": position} when the page is full", "Events"), &["404"])}},
            "/groups": {"get": {"operationId": "groups", "summary": "Consumer groups stored in the store, with checkpoint, lag and parked count", "responses": responses(ok("the groups", "Groups"), &[])}},
            "/sagas": {"get": {"operationId": "sagas", "summary": "The sagas in the store, newest first: status, step, progress, why it failed (as `cairn sagas list --json`)",
                "parameters": [param("saga", "query", "only sagas of this type", json!({"type": "string"})),
                               param("status", "query", "only sagas in this state", json!({"type": "string", "enum": ["running", "compensating", "completed", "compensated", "needs_attention"]})),
                               param("limit", "query", "most `$saga-` streams to look at, by name (default 1000, at most 10000)", json!({"type": "integer", "minimum": 0}))],
                "responses": responses(ok("the sagas; `truncated` when there may be more", "Sagas"), &[])}},
            "/sagas/{name}/{id}": {"get": {"operationId": "saga", "summary": "One saga (steps and timeline) or process instance (state, deadlines, reactions); `kind` says which",
                "parameters": [param("name", "path", "the saga's type or the process's name", json!({"type": "string"})), param("id", "path", "the saga's id or the instance's correlation id", json!({"type": "string"}))],
                "responses": responses(ok("the saga or process instance", "Saga"), &["404"])}},
            "/processes": {"get": {"operationId": "processes", "summary": "The process-manager instances, latest change first (as `cairn sagas processes --json`)",
                "parameters": [param("process", "query", "only instances of this process", json!({"type": "string"})),
                               param("status", "query", "only instances in this state", json!({"type": "string", "enum": ["running", "parked", "ended"]})),
                               param("limit", "query", "most `$saga-` streams to look at, by name (default 1000, at most 10000)", json!({"type": "integer", "minimum": 0}))],
                "responses": responses(ok("the instances; `truncated` when there may be more", "Processes"), &[])}},
            "/head": {"get": {"operationId": "head", "summary": "Where the next event goes, and the newest event's position", "responses": responses(ok("the head", "Head"), &[])}},
            "/health": {"get": {"operationId": "health", "summary": "Liveness and readiness", "security": [{}], "responses": {
                "200": ok("ready", "Health"), "503": ok("not ready: the store cannot take appends now", "Health"), "413": error_response("`body_too_large`")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "security": [{}], "responses": {
                "200": {"description": "text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}, "413": error_response("`body_too_large`")}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "security": [{}], "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}, "413": error_response("`body_too_large`")}}},
            "/": {"get": {"operationId": "ui", "summary": "The web UI", "security": [{}], "responses": {
                "200": {"description": "a page that reads the API", "content": {"text/html": {"schema": {"type": "string"}}}}, "413": error_response("`body_too_large`")}}}
        },
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "a key from `cairn keys add`; required when the server has keys"}}, "schemas": {
            "AppendRequest": {"type": "object", "additionalProperties": false, "required": ["events"], "properties": {
                "expected_version": {"anyOf": [expected, {"type": "null"}], "description": "any (the default), no_stream, exists, or the stream's version"},
                "events": {"type": "array", "minItems": 1, "maxItems": limits.append_events_max, "items": {"$ref": "#/components/schemas/NewEvent"}},
                "condition": {"anyOf": [{"$ref": "#/components/schemas/AppendCondition"}, {"type": "null"}]}}},
            "AppendCondition": {"type": "object", "additionalProperties": false, "required": ["fail_if_events_match"], "description": "fail (409 append_condition_failed) if an event matching the query was appended after `after`", "properties": {
                "fail_if_events_match": {"$ref": "#/components/schemas/Query"}, "after": nullable(u64_schema())}},
            "NewEvent": {"type": "object", "additionalProperties": false, "required": ["type", "data"],
                "description": "ids unique within the append; `data` is any JSON (content_type json) or base64 (binary)",
                "properties": {
                    "id": {"anyOf": [uuid, {"type": "null"}]},
                    "type": {"type": "string", "pattern": name_pattern("$", "", event_type_max), "description": format!("1 to {event_type_max} bytes; '$' types are the store's")},
                    "data": {}, "content_type": {"enum": ["json", "binary"]},
                    "metadata": {"$ref": "#/components/schemas/Metadata"},
                    "schema_version": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                    "tags": {"type": "array", "maxItems": limits.event_tags_max, "uniqueItems": true, "items": tag.clone()}},
                "if": {"required": ["content_type"], "properties": {"content_type": {"const": "binary"}}},
                "then": {"properties": {"data": {"type": "string", "pattern": base64}}}},
            "Metadata": {"type": "object", "properties": {"correlation_id": meta_id.clone(), "causation_id": meta_id}, "additionalProperties": {"type": "string"}},
            "Event": {"type": "object", "required": ["id", "stream", "type", "version", "position", "timestamp", "schema_version", "content_type", "data", "metadata"], "properties": {
                "id": {"type": "string", "format": "uuid"}, "stream": {"type": "string"}, "type": {"type": "string"},
                "version": {"type": "integer", "minimum": 1}, "position": {"type": "integer", "minimum": 0}, "timestamp": {"type": "string", "format": "date-time"},
                "schema_version": {"type": "integer"}, "content_type": {"enum": ["json", "binary"]}, "data": {}, "metadata": {"$ref": "#/components/schemas/Metadata"},
                "tags": {"type": "array", "items": {"type": "string"}}}},
            "Events": {"type": "object", "required": ["events"], "properties": {
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                "next": {"description": "where the next page starts: pass `after` (GET /all, POST /query, same direction) or `from` (a stream)", "oneOf": [
                    {"type": "object", "required": ["after"], "additionalProperties": false, "properties": {"after": {"type": "integer", "minimum": 0}}},
                    {"type": "object", "required": ["from"], "additionalProperties": false, "properties": {"from": {"type": "integer", "minimum": 0}}}]}}},
            "AppendResult": {"type": "object", "required": ["next_version", "position"], "properties": {"next_version": {"type": "integer", "minimum": 0}, "position": {"type": "integer", "minimum": 0}}},
            "StreamInfo": {"type": "object", "required": ["stream", "version", "state", "metadata", "last_position"], "properties": {
                "stream": {"type": "string"}, "version": {"type": "integer", "minimum": 0}, "state": {"enum": ["live", "deleted", "tombstoned"]},
                "metadata": {"$ref": "#/components/schemas/StreamMetadata"}, "last_position": {"type": ["integer", "null"], "minimum": 0}}},
            "Streams": {"type": "object", "required": ["streams"], "properties": {
                "streams": {"type": "array", "items": {"$ref": "#/components/schemas/StreamInfo"}}, "truncated": {"const": true}}},
            "StreamMetadata": {"type": "object", "additionalProperties": false, "properties": {
                "max_age_secs": nullable(u64_schema()), "max_count": {"type": ["integer", "null"], "minimum": 1, "maximum": u64::MAX}, "truncate_before": nullable(u64_schema())}},
            "Query": {"type": "object", "additionalProperties": false, "required": ["items"], "properties": {"items": {
                "type": "array", "minItems": 1, "maxItems": QUERY_ITEMS_MAX, "description": "an event matches if it matches any item; an item with nothing in it matches every event",
                "items": {"type": "object", "additionalProperties": false, "description": "events of one of `types`, with all of `tags`, in a stream of one of `categories`", "properties": {
                    "types": terms(json!({"type": "string", "pattern": name_pattern("", "", event_type_max)})),
                    "tags": terms(tag),
                    "categories": terms(json!({"type": "string", "pattern": name_pattern("$\\-", "\\-", STREAM_NAME_BYTES_MAX - 1)}))}}}}},
            "QueryRequest": {"type": "object", "additionalProperties": false, "required": ["query"],
                "not": {"required": ["from", "after"], "properties": {"from": {"type": "integer"}, "after": {"type": "integer"}}},
                "properties": {
                    "query": {"$ref": "#/components/schemas/Query"},
                    "from": nullable(u64_schema()), "after": nullable(u64_schema()),
                    "limit": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX, "description": format!("default 1000; a larger limit is lowered to {EVENTS_PAGE_MAX}")},
                    "direction": {"enum": ["forward", "backward"]}}},
            "Head": {"type": "object", "required": ["head", "last"], "properties": {"head": {"type": "integer", "minimum": 0}, "last": {"type": ["integer", "null"], "minimum": 0}}},
            "Sagas": {"type": "object", "required": ["sagas", "looked_at", "truncated"], "properties": {"sagas": {"type": "array", "items": {"type": "object", "required": ["stream", "saga", "id", "status"]}}, "looked_at": {"type": "integer"}, "truncated": {"type": "boolean"}}},
            "Saga": {"type": "object", "required": ["kind", "stream", "status", "timeline"], "properties": {"kind": {"type": "string", "enum": ["saga", "process"]}}},
            "Processes": {"type": "object", "required": ["processes", "looked_at", "truncated"], "properties": {"processes": {"type": "array", "items": {"type": "object", "required": ["stream", "process", "correlation", "status"]}}, "looked_at": {"type": "integer"}, "truncated": {"type": "boolean"}}},
            "Groups": {"type": "object", "required": ["groups"], "properties": {"groups": {"type": "array", "items": {"type": "object", "required": ["group", "parked", "replay_pending"]}}}},
            "Health": {"type": "object", "required": ["status", "live", "ready"], "properties": {"status": {"enum": ["ok", "unavailable"]}, "live": {"type": "boolean"}, "ready": {"type": "boolean"}}},
            "Error": {"type": "object", "required": ["error", "message"], "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}
        }}
    })
}

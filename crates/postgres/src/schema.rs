//! The schema, created and changed by numbered migrations. Each migration
//! runs once, in its own transaction, under an advisory lock, so several
//! `cairn serve` processes starting together on one database are safe.

use tokio_postgres::Client;

/// (version, what it does, SQL). Append new ones; never edit an applied one.
/// `{key}` is the schema's advisory lock key for appends (see `append`).
/// A migration: its version, what it does, and its SQL.
type Migration = (i32, &'static str, fn() -> String);

const MIGRATIONS: &[Migration] = &[
    (1, "events, streams, positions and the append function", || V1.to_string()),
    (2, "a retry must resend the same content to the stream's current incarnation", v2),
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Streams, with what an append must check under the stream's row lock.
/// A row with version 0 in state live is a name only (a failed first
/// append, or metadata set before any event): it reads as "not found".
/// States: 0 live, 1 soft-deleted, 2 tombstoned. A delete starts a new
/// incarnation, so the old events stay in `$all` but leave the stream.
const V1: &str = r#"
CREATE TABLE cairn_streams (
    name text COLLATE "C" PRIMARY KEY,
    incarnation int NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 0,
    state smallint NOT NULL DEFAULT 0,
    max_age_secs bigint,
    max_count bigint,
    truncate_before bigint,
    last_position bigint
);

-- Positions: one per event, from a sequence that caches nothing, so that a
-- gap is either a transaction still running or one that rolled back.
CREATE SEQUENCE cairn_positions AS bigint START 1 CACHE 1;

CREATE TABLE cairn_events (
    position bigint PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    stream text COLLATE "C" NOT NULL,
    incarnation int NOT NULL,
    version bigint NOT NULL,
    event_type text COLLATE "C" NOT NULL,
    category text COLLATE "C",
    sys boolean NOT NULL,
    data bytea NOT NULL,
    is_binary boolean NOT NULL,
    -- Metadata: the two ids as columns (indexable, no JSON on the hot path),
    -- other entries as a JSON object in text (cast to jsonb to query it).
    correlation_id uuid,
    causation_id uuid,
    metadata_extra text,
    schema_version int NOT NULL,
    tags text[] COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    append_first bigint NOT NULL,
    append_len int NOT NULL
);
CREATE UNIQUE INDEX cairn_events_stream ON cairn_events (stream, incarnation, version);
CREATE INDEX cairn_events_type ON cairn_events (event_type, position) WHERE NOT sys;
CREATE INDEX cairn_events_category ON cairn_events (category, position) WHERE category IS NOT NULL;
-- Only tagged events: an empty array in a GIN index costs as much as a full one.
CREATE INDEX cairn_events_tags ON cairn_events USING gin (tags) WHERE NOT sys AND tags <> '{}';

-- Whether a batch was written before: every id, in order, as one whole
-- append to this stream. No row: none of the ids exists. Otherwise the
-- first append's result (code 0) or why it is not a retry (code 4).
CREATE FUNCTION cairn_retry_of(p_stream text, p_ids uuid[])
RETURNS TABLE (o_code int, o_version bigint, o_position bigint, o_id uuid, o_detail text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    n int := cardinality(p_ids);
    f record;
    found_n int := 0;
    prev_version bigint;
    last_pos bigint;
BEGIN
    FOR f IN SELECT u.ord, e.stream, e.version, e.position, e.append_first, e.append_len
             FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord) JOIN cairn_events e ON e.id = u.id
             ORDER BY u.ord
    LOOP
        found_n := found_n + 1;
        IF f.ord <> found_n THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[1], 'but other events of the batch were not'; RETURN;
        END IF;
        IF f.stream <> p_stream THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord], format('to stream %L', f.stream); RETURN;
        END IF;
        IF found_n > 1 AND f.version <> prev_version + 1 THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord], 'but not as part of the same append'; RETURN;
        END IF;
        IF found_n = 1 AND (f.append_first <> f.position OR f.append_len <> n) THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[1], 'as part of a larger append'; RETURN;
        END IF;
        prev_version := f.version;
        last_pos := f.position;
    END LOOP;
    IF found_n > 0 AND found_n < n THEN
        RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[1], 'but other events of the batch were not'; RETURN;
    END IF;
    IF found_n > 0 THEN
        RETURN QUERY SELECT 0, prev_version, last_pos, NULL::uuid, NULL::text;
    END IF;
END
$fn$;

-- One append, checked and written in one call (one round trip). Codes:
-- 0 written (or an idempotent retry), 1 wrong expected version, 2 stream
-- tombstoned, 3 stream not found, 4 idempotency conflict, 5 condition failed.
-- Failed checks return before writing anything but the stream's name row.
-- Retries are looked for up front only with p_check_first; otherwise only
-- when a check fails or an id turns out to exist (then it raises CA410 and
-- the caller calls again with p_check_first), so that the common append
-- pays no lookup: the id index's insert does the work.
CREATE FUNCTION cairn_append(
    p_stream text, p_kind int, p_target text, p_expected bigint, p_category text,
    p_ids uuid[], p_types text[], p_data bytea[], p_binary boolean[], p_corr uuid[], p_caus uuid[], p_extra text[], p_schema int[],
    p_tags text[], p_tag_lo int[], p_tag_hi int[],
    p_cond text, p_cond_types text[], p_cond_tags text[], p_cond_cats text[], p_cond_after bigint,
    p_max_age bigint, p_max_count bigint, p_truncate bigint, p_check_first boolean)
RETURNS TABLE (o_code int, o_version bigint, o_position bigint, o_id uuid, o_detail text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    n int := cardinality(p_ids);
    s cairn_streams%ROWTYPE;
    t cairn_streams%ROWTYPE;
    r record;
    positions bigint[];
    conflict bigint;
    inserted int;
    hard boolean := false;
    current bigint;
    fail_code int;
    now_us bigint;
    fail_version bigint := 0;
    fail_position bigint := 0;
    fail_stream text;
BEGIN
    -- Conditional appends see every append ordered before them: they wait
    -- for the appends in flight and hold new ones back until they commit.
    IF p_cond IS NULL THEN
        PERFORM pg_advisory_xact_lock_shared({key});
    ELSE
        PERFORM pg_advisory_xact_lock({key});
    END IF;
    -- Readers rely on this transaction having its id before it takes positions.
    PERFORM pg_current_xact_id();
    INSERT INTO cairn_streams (name) VALUES (p_stream) ON CONFLICT DO NOTHING;
    SELECT * INTO s FROM cairn_streams x WHERE x.name = p_stream FOR UPDATE;
    IF p_kind <> 0 THEN
        INSERT INTO cairn_streams (name) VALUES (p_target) ON CONFLICT DO NOTHING;
        SELECT * INTO t FROM cairn_streams x WHERE x.name = p_target FOR UPDATE;
    END IF;

    IF p_kind = 0 AND p_check_first THEN
        SELECT * INTO r FROM cairn_retry_of(p_stream, p_ids);
        IF FOUND THEN
            RETURN QUERY SELECT r.o_code, r.o_version, r.o_position, r.o_id, r.o_detail; RETURN;
        END IF;
    END IF;

    IF p_kind = 2 THEN
        hard := p_types[1] = '$tombstone';
        IF t.state = 2 THEN
            fail_code := 2; fail_stream := p_target;
        ELSIF NOT hard AND (t.state = 1 OR t.version = 0) THEN
            fail_code := 3; fail_stream := p_target;
        END IF;
        current := t.version;
    ELSE
        IF p_kind = 1 AND t.state = 2 THEN
            fail_code := 2; fail_stream := p_target;
        ELSIF s.state = 2 THEN
            fail_code := 2; fail_stream := p_stream;
        END IF;
        current := s.version;
    END IF;
    IF fail_code IS NULL AND NOT (p_expected = -1 OR (p_expected = -2 AND current > 0) OR p_expected = current) THEN
        fail_code := 1; fail_version := current;
    END IF;
    IF fail_code IS NULL AND p_cond IS NOT NULL THEN
        EXECUTE p_cond INTO conflict USING p_cond_types, p_cond_tags, p_cond_cats, p_cond_after;
        IF conflict IS NOT NULL THEN
            fail_code := 5; fail_position := conflict;
        END IF;
    END IF;
    IF fail_code IS NOT NULL THEN
        -- A retry of a written batch gets its result, whatever changed since.
        IF p_kind = 0 AND NOT p_check_first THEN
            SELECT * INTO r FROM cairn_retry_of(p_stream, p_ids);
            IF FOUND THEN
                RETURN QUERY SELECT r.o_code, r.o_version, r.o_position, r.o_id, r.o_detail; RETURN;
            END IF;
        END IF;
        RETURN QUERY SELECT fail_code, fail_version, fail_position, NULL::uuid, fail_stream; RETURN;
    END IF;

    positions := ARRAY(SELECT nextval('cairn_positions') FROM generate_series(1, n));
    now_us := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    INSERT INTO cairn_events (position, id, stream, incarnation, version, event_type, category, sys, data,
                              is_binary, correlation_id, causation_id, metadata_extra, schema_version, tags, created_at,
                              append_first, append_len)
    SELECT positions[u.ord], u.id, p_stream, s.incarnation, s.version + u.ord, u.typ, p_category,
           left(p_stream, 1) = '$', u.dat, u.bin, u.corr, u.caus, u.extra, u.sv,
           CASE WHEN u.hi >= u.lo THEN p_tags[u.lo:u.hi] ELSE '{}' END,
           now_us, positions[1], n
    FROM unnest(p_ids, p_types, p_data, p_binary, p_corr, p_caus, p_extra, p_schema, p_tag_lo, p_tag_hi)
         WITH ORDINALITY AS u(id, typ, dat, bin, corr, caus, extra, sv, lo, hi, ord)
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted < n THEN
        IF p_check_first THEN
            -- A concurrent append wrote one of these ids first (it committed while we waited on it).
            RAISE EXCEPTION 'an event id of this batch was written by a concurrent append' USING ERRCODE = 'CA409';
        END IF;
        RAISE EXCEPTION 'an event id of this batch exists: look for a retry' USING ERRCODE = 'CA410';
    END IF;
    UPDATE cairn_streams x SET version = s.version + n, state = 0, last_position = positions[n] WHERE x.name = p_stream;
    IF p_kind = 1 THEN
        UPDATE cairn_streams x SET max_age_secs = p_max_age, max_count = p_max_count, truncate_before = p_truncate
        WHERE x.name = p_target;
    ELSIF p_kind = 2 THEN
        UPDATE cairn_streams x SET version = 0, state = CASE WHEN hard THEN 2 ELSE 1 END,
            incarnation = t.incarnation + 1, last_position = NULL
        WHERE x.name = p_target;
    END IF;
    RETURN QUERY SELECT 0, s.version + n, positions[n], NULL::uuid, NULL::text;
END
$fn$;
"#;

/// Whether a batch was written before, as `cairn_retry_of`, but stricter: each
/// id must come back with the same type, payload, content type and tags, and
/// in the stream's current incarnation (not lost to a delete since).
const RETRY_CHECK: &str = r#"
CREATE FUNCTION cairn_retry_check(p_stream text, p_ids uuid[], p_types text[], p_data bytea[], p_binary boolean[],
                                  p_tags text[], p_tag_lo int[], p_tag_hi int[])
RETURNS TABLE (o_code int, o_version bigint, o_position bigint, o_id uuid, o_detail text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    n int := cardinality(p_ids);
    f record;
    found_n int := 0;
    prev_version bigint;
    last_pos bigint;
    live int;
BEGIN
    SELECT x.incarnation INTO live FROM cairn_streams x WHERE x.name = p_stream;
    FOR f IN SELECT u.ord, e.stream, e.incarnation, e.version, e.position, e.append_first, e.append_len,
                    (e.event_type = p_types[u.ord] AND e.data = p_data[u.ord] AND e.is_binary = p_binary[u.ord]
                     AND e.tags = CASE WHEN p_tag_hi[u.ord] >= p_tag_lo[u.ord] THEN p_tags[p_tag_lo[u.ord]:p_tag_hi[u.ord]]
                                       ELSE '{}'::text[] END) AS same
             FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord) JOIN cairn_events e ON e.id = u.id
             ORDER BY u.ord
    LOOP
        found_n := found_n + 1;
        IF f.ord <> found_n THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord], format('but event %s of the same batch was not', p_ids[found_n]); RETURN;
        END IF;
        IF f.stream <> p_stream THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord], format('to stream %L', f.stream); RETURN;
        END IF;
        IF NOT f.same THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord], 'with a different type, payload or tags'; RETURN;
        END IF;
        IF found_n > 1 AND f.version <> prev_version + 1 THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord], 'but not as part of the same append'; RETURN;
        END IF;
        IF f.incarnation IS DISTINCT FROM live THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[f.ord],
                format('to stream %L, which was deleted since; send new ids to write it again', p_stream); RETURN;
        END IF;
        IF found_n = 1 AND (f.append_first <> f.position OR f.append_len <> n) THEN
            RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[1], 'as part of a larger append'; RETURN;
        END IF;
        prev_version := f.version;
        last_pos := f.position;
    END LOOP;
    IF found_n > 0 AND found_n < n THEN
        RETURN QUERY SELECT 4, 0::bigint, 0::bigint, p_ids[1], format('but event %s of the same batch was not', p_ids[found_n + 1]); RETURN;
    END IF;
    IF found_n > 0 THEN
        RETURN QUERY SELECT 0, prev_version, last_pos, NULL::uuid, NULL::text;
    END IF;
END
$fn$;
"#;

/// Migration 2: [`RETRY_CHECK`], and `cairn_append` as in V1 but asking it.
fn v2() -> String {
    let append = &V1[V1.find("CREATE FUNCTION cairn_append(").expect("V1 defines cairn_append")..];
    let old_call = "cairn_retry_of(p_stream, p_ids)";
    assert_eq!(append.matches(old_call).count(), 2, "cairn_append asks for retries in two places");
    let append = append
        .replacen("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        .replace(old_call, "cairn_retry_check(p_stream, p_ids, p_types, p_data, p_binary, p_tags, p_tag_lo, p_tag_hi)")
        .replace("-- A retry of a written batch gets its result, whatever changed since.", "-- A retry of a written batch gets its result, whatever was appended since.");
    format!("{RETRY_CHECK}\n{append}")
}

/// Brings the schema up to [`SCHEMA_VERSION`]; returns the migrations applied.
/// Refuses a database that a newer Cairn has migrated past this build.
pub async fn migrate(
    client: &mut Client,
    schema: &str,
    key: i64,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    let schema_ident = ident(schema);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(key ^ 0x6d69_6772)]).await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema_ident};
         CREATE TABLE IF NOT EXISTS {schema_ident}.cairn_migrations (
             version int PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await?;
    let applied: Vec<i32> = tx
        .query(
            &format!("SELECT version FROM {schema_ident}.cairn_migrations ORDER BY version"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut done = Vec::new();
    for (version, description, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(&format!(
            "SET LOCAL search_path TO {schema_ident}; {}",
            sql().replace("{key}", &key.to_string())
        ))
        .await?;
        tx.execute(
            &format!(
                "INSERT INTO {schema_ident}.cairn_migrations (version, description) VALUES ($1, $2)"
            ),
            &[version, description],
        )
        .await?;
        done.push(*version);
    }
    tx.commit().await?;
    Ok(done)
}

/// The newest migration applied to `schema`, if any.
pub async fn applied_version(
    client: &Client,
    schema: &str,
) -> Result<Option<i32>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.cairn_migrations", ident(schema))],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    client
        .query_one(&format!("SELECT max(version) FROM {}.cairn_migrations", ident(schema)), &[])
        .await
        .map(|r| r.get(0))
}

/// A quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

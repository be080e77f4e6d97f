//! Read models in PostgreSQL.
//!
//! The model runs its queries on the client it was given, inside the
//! runner's task: any tokio runtime will do.

use std::future::Future;

use cairn_core::{Position, RecordedEvent, Timestamp};
use tokio_postgres::{Client, Transaction};

use crate::{ProjectionError, Requested, Sink, Source, StoredCheckpoint};

/// A projection into PostgreSQL tables the application owns. Each batch of
/// events and the checkpoint commit in one transaction.
pub trait PgProjection: Send + Sync + 'static {
    fn name(&self) -> &str;

    /// Creates the projection's tables (`CREATE TABLE IF NOT EXISTS ...`),
    /// under the model's advisory lock so that concurrent starts do not race.
    fn setup(
        &self,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;

    /// Applies one event inside the batch's transaction.
    fn apply(
        &self,
        tx: &Transaction<'_>,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send;

    /// Empties (or drops) the projection's tables before a replay from the
    /// start; `setup` runs right after, in the same transaction.
    fn reset(
        &self,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

/// A read model in PostgreSQL: the projection's tables plus `cairn_checkpoints`,
/// `cairn_control` and `cairn_sources`, in the connection's schema (set
/// `options=-csearch_path=...` in the connection string to pick another).
pub struct PgModel<P: PgProjection> {
    client: Client,
    projection: P,
    /// The stored checkpoint as this model last read or wrote it: a batch
    /// commits only if it is still that, so two runners cannot both apply.
    last: Option<Position>,
}

/// Concurrent `CREATE TABLE IF NOT EXISTS` can fail in PostgreSQL (a unique
/// violation in its catalog), so setups take this lock first.
const SETUP: &str = "SELECT pg_advisory_xact_lock(hashtext('cairn_checkpoints'));
    CREATE TABLE IF NOT EXISTS cairn_checkpoints (
        projection TEXT PRIMARY KEY,
        position BIGINT NOT NULL,
        event_time BIGINT NOT NULL, -- microseconds since the epoch, like Timestamp
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS cairn_control (
        projection TEXT PRIMARY KEY,
        paused BOOLEAN NOT NULL DEFAULT false,
        reset BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE IF NOT EXISTS cairn_sources (
        projection TEXT PRIMARY KEY,
        source TEXT NOT NULL
    )";

async fn setup<P: PgProjection>(
    tx: &Transaction<'_>,
    projection: &P,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(SETUP).await?;
    projection.setup(tx).await
}

fn pg_error(projection: &str) -> impl Fn(tokio_postgres::Error) -> ProjectionError + '_ {
    move |source| ProjectionError::Postgres { projection: projection.to_string(), source }
}

impl<P: PgProjection> PgModel<P> {
    /// Sets up the tables (the model's and the projection's) and keeps
    /// `client`, whose connection must keep running.
    pub async fn open(mut client: Client, projection: P) -> Result<Self, ProjectionError> {
        let name = projection.name().to_string();
        let pg = pg_error(&name);
        let tx = client.transaction().await.map_err(&pg)?;
        setup(&tx, &projection).await.map_err(&pg)?;
        tx.commit().await.map_err(&pg)?;
        let row = client
            .query_opt("SELECT position FROM cairn_checkpoints WHERE projection = $1", &[&name])
            .await
            .map_err(&pg)?;
        let last = row.map(|r| Position(r.get::<_, i64>(0) as u64));
        Ok(PgModel { client, projection, last })
    }

    /// Runs one query's worth of work on the client and waits for it.
    async fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut Client, &str) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, ProjectionError> {
        let name = self.projection.name();
        work(&mut self.client, name).await.map_err(pg_error(name))
    }
}

#[async_trait::async_trait]
impl<P: PgProjection> Sink for PgModel<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    async fn checkpoint(&mut self) -> Result<Option<(Position, Timestamp)>, ProjectionError> {
        let row = self
            .run(async |c, name| {
                c.query_opt(
                    "SELECT position, event_time FROM cairn_checkpoints WHERE projection = $1",
                    &[&name],
                )
                .await
            })
            .await?;
        let checkpoint = row.map(|r| (Position(r.get::<_, i64>(0) as u64), Timestamp(r.get(1))));
        self.last = checkpoint.map(|c| c.0);
        Ok(checkpoint)
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: (Position, Timestamp),
    ) -> Result<(), ProjectionError> {
        let PgModel { client, projection, last } = self;
        let name = projection.name();
        let pg = pg_error(name);
        let expected = *last;
        let applied: Result<(), ProjectionError> = async {
            let tx = client.transaction().await.map_err(&pg)?;
            for e in events {
                projection.apply(&tx, e).await.map_err(|reason| ProjectionError::Handler {
                    projection: name.to_string(),
                    position: e.position,
                    reason: reason.to_string(),
                })?;
            }
            let (position, event_time, now) =
                (checkpoint.0.0 as i64, checkpoint.1.0, Timestamp::now().0);
            // Moves the checkpoint only from where this model saw it (UPDATE
            // re-checks the row after a concurrent commit; INSERT finds it).
            let moved = match expected {
                None => {
                    tx.execute(
                        "INSERT INTO cairn_checkpoints (projection, position, event_time, updated_at) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (projection) DO NOTHING",
                        &[&name, &position, &event_time, &now],
                    )
                    .await
                }
                Some(p) => {
                    tx.execute(
                        "UPDATE cairn_checkpoints SET position = $2, event_time = $3, updated_at = $4 WHERE projection = $1 AND position = $5",
                        &[&name, &position, &event_time, &now, &(p.0 as i64)],
                    )
                    .await
                }
            }
            .map_err(&pg)?;
            if moved != 1 {
                return Err(ProjectionError::CheckpointMoved {
                    projection: name.to_string(),
                    expected,
                });
            }
            // An error above drops `tx`, which rolls back the whole batch.
            tx.commit().await.map_err(&pg)
        }
        .await;
        applied?;
        *last = Some(checkpoint.0);
        Ok(())
    }

    async fn follows(&mut self, source: &Source) -> Result<(), ProjectionError> {
        let source = serde_json::to_string(source).expect("a source serialises");
        self.run(async |c, name| {
            c.execute(
                "INSERT INTO cairn_sources (projection, source) VALUES ($1, $2) ON CONFLICT (projection) DO UPDATE SET source = $2",
                &[&name, &source],
            )
            .await
        })
        .await
        .map(drop)
    }

    async fn requested(&mut self) -> Result<Requested, ProjectionError> {
        let row = self
            .run(async |c, name| {
                c.query_opt(
                    "SELECT paused, reset FROM cairn_control WHERE projection = $1",
                    &[&name],
                )
                .await
            })
            .await?;
        Ok(row.map_or_else(Requested::default, |r| Requested { paused: r.get(0), reset: r.get(1) }))
    }

    /// Lets the projection empty its tables, sets them up again, forgets the
    /// checkpoint and clears a reset request, in one transaction. A pause
    /// request stays.
    async fn reset(&mut self) -> Result<(), ProjectionError> {
        let PgModel { client, projection, last } = self;
        let name = projection.name();
        let reset: Result<(), tokio_postgres::Error> = async {
            let tx = client.transaction().await?;
            projection.reset(&tx).await?;
            setup(&tx, projection).await?;
            tx.execute("DELETE FROM cairn_checkpoints WHERE projection = $1", &[&name]).await?;
            tx.execute("UPDATE cairn_control SET reset = false WHERE projection = $1", &[&name])
                .await?;
            tx.commit().await
        }
        .await;
        reset.map_err(pg_error(name))?;
        *last = None;
        Ok(())
    }
}

/// The checkpoints stored in the database `client` is connected to (one per
/// projection), for operators.
pub async fn pg_stored_checkpoints(
    client: &Client,
) -> Result<Vec<StoredCheckpoint>, ProjectionError> {
    let rows = client
        .query(
            "SELECT c.projection, c.position, c.event_time, c.updated_at, COALESCE(k.paused, false), COALESCE(k.reset, false), s.source
             FROM cairn_checkpoints c
             LEFT JOIN cairn_control k ON k.projection = c.projection
             LEFT JOIN cairn_sources s ON s.projection = c.projection
             ORDER BY c.projection",
            &[],
        )
        .await
        .map_err(pg_error("*"))?;
    Ok(rows
        .iter()
        .map(|r| StoredCheckpoint {
            projection: r.get(0),
            position: Position(r.get::<_, i64>(1) as u64),
            event_time: Timestamp(r.get(2)),
            updated_at: Timestamp(r.get(3)),
            requested: Requested { paused: r.get(4), reset: r.get(5) },
            source: r.get::<_, Option<String>>(6).and_then(|s| serde_json::from_str(&s).ok()),
        })
        .collect())
}

/// Stores a request for `projection` in the database `client` is connected
/// to; its runner acts on it within a quarter of a second. `paused`:
/// `Some(true)` to pause, `Some(false)` to resume; `reset`: empty the model
/// and replay.
pub async fn pg_request(
    client: &Client,
    projection: &str,
    paused: Option<bool>,
    reset: bool,
) -> Result<(), ProjectionError> {
    client
        .execute(
            "INSERT INTO cairn_control (projection, paused, reset) VALUES ($1, COALESCE($2, false), $3)
             ON CONFLICT (projection) DO UPDATE SET paused = COALESCE($2, cairn_control.paused), reset = cairn_control.reset OR $3",
            &[&projection, &paused, &reset],
        )
        .await
        .map_err(pg_error(projection))?;
    Ok(())
}

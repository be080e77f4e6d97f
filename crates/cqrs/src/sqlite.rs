use std::path::{Path, PathBuf};

use cairn_core::{Position, RecordedEvent, Timestamp};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::{ProjectionError, Requested, Sink, Source, StoredCheckpoint};

/// A projection into tables of a SQLite file: plain SQL, a schema the
/// projection owns. Each batch of events and the checkpoint commit in one
/// transaction.
pub trait SqliteProjection: Send + 'static {
    fn name(&self) -> &str;

    /// Creates the projection's tables (`CREATE TABLE IF NOT EXISTS ...`).
    fn setup(&self, tx: &Transaction) -> rusqlite::Result<()>;

    /// Applies one event inside the batch's transaction.
    fn apply(
        &self,
        tx: &Transaction,
        event: &RecordedEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A SQLite read model file: the projection's tables plus `cairn_checkpoints`.
pub struct SqliteModel<P: SqliteProjection> {
    path: PathBuf,
    conn: Connection,
    projection: P,
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL: readers never block the projection. NORMAL sync: a power cut may
    // lose the newest batches, but a batch and its checkpoint go together.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS cairn_checkpoints (
             projection TEXT PRIMARY KEY,
             position INTEGER NOT NULL,
             event_time INTEGER NOT NULL,
             updated_at INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS cairn_control (
             projection TEXT PRIMARY KEY,
             paused INTEGER NOT NULL DEFAULT 0,
             reset INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS cairn_sources (
             projection TEXT PRIMARY KEY,
             source TEXT NOT NULL
         )",
    )?;
    Ok(conn)
}

impl<P: SqliteProjection> SqliteModel<P> {
    /// Opens (or creates) the read model at `path` and sets up its tables.
    pub fn open(path: impl AsRef<Path>, projection: P) -> Result<Self, ProjectionError> {
        let path = path.as_ref().to_path_buf();
        let sql =
            |source| ProjectionError::Sqlite { projection: projection.name().to_string(), source };
        let mut conn = open(&path).map_err(sql)?;
        let tx = conn.transaction().map_err(sql)?;
        projection.setup(&tx).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(SqliteModel { path, conn, projection })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new connection for queries (read models are for reading).
    pub fn reader(&self) -> Result<Connection, ProjectionError> {
        Connection::open(&self.path).map_err(|source| self.sql(source))
    }

    /// Replaces the read model at `live` with this one, atomically (a rename):
    /// readers that open the file afterwards see the new model. Stop the
    /// runner on the old file first; start one on the returned model.
    pub fn replace(self, live: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let live = live.as_ref().to_path_buf();
        let io = |source| ProjectionError::Io { path: live.display().to_string(), source };
        // Fold the WAL into the main file so that one rename moves everything.
        self.conn
            .pragma_update(None, "wal_checkpoint", "TRUNCATE")
            .map_err(|source| self.sql(source))?;
        let SqliteModel { path, conn, projection } = self;
        drop(conn);
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", live.display()));
        }
        std::fs::rename(&path, &live).map_err(io)?;
        SqliteModel::open(live, projection)
    }

    fn sql(&self, source: rusqlite::Error) -> ProjectionError {
        ProjectionError::Sqlite { projection: self.projection.name().to_string(), source }
    }
}

#[async_trait::async_trait]
impl<P: SqliteProjection> Sink for SqliteModel<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    async fn checkpoint(&mut self) -> Result<Option<(Position, Timestamp)>, ProjectionError> {
        crate::blocking(|| {
            self.conn
                .query_row(
                    "SELECT position, event_time FROM cairn_checkpoints WHERE projection = ?1",
                    params![self.projection.name()],
                    |row| Ok((Position(row.get::<_, i64>(0)? as u64), Timestamp(row.get(1)?))),
                )
                .optional()
                .map_err(|source| self.sql(source))
        })
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: (Position, Timestamp),
    ) -> Result<(), ProjectionError> {
        crate::blocking(|| {
            let name = self.projection.name().to_string();
            let sql = |source| ProjectionError::Sqlite { projection: name.clone(), source };
            let tx = self.conn.transaction().map_err(sql)?;
            for e in events {
                self.projection.apply(&tx, e).map_err(|reason| ProjectionError::Handler {
                    projection: name.clone(),
                    position: e.position,
                    reason: reason.to_string(),
                })?;
            }
            tx.prepare_cached(
                "INSERT INTO cairn_checkpoints (projection, position, event_time, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (projection) DO UPDATE SET position = ?2, event_time = ?3, updated_at = ?4",
            )
            .and_then(|mut s| s.execute(params![name, checkpoint.0 .0 as i64, checkpoint.1 .0, Timestamp::now().0]))
            .map_err(sql)?;
            tx.commit().map_err(sql)
        })
    }

    async fn follows(&mut self, source: &Source) -> Result<(), ProjectionError> {
        crate::blocking(|| {
            let source = serde_json::to_string(source).expect("a source serialises");
            self.conn
                .execute(
                    "INSERT INTO cairn_sources (projection, source) VALUES (?1, ?2)
                     ON CONFLICT (projection) DO UPDATE SET source = ?2",
                    params![self.projection.name(), source],
                )
                .map(drop)
                .map_err(|source| self.sql(source))
        })
    }

    async fn requested(&mut self) -> Result<Requested, ProjectionError> {
        crate::blocking(|| {
            self.conn
                .prepare_cached("SELECT paused, reset FROM cairn_control WHERE projection = ?1")
                .and_then(|mut s| {
                    s.query_row(params![self.projection.name()], |r| {
                        Ok(Requested { paused: r.get(0)?, reset: r.get(1)? })
                    })
                    .optional()
                })
                .map(Option::unwrap_or_default)
                .map_err(|source| self.sql(source))
        })
    }

    async fn reset(&mut self) -> Result<(), ProjectionError> {
        crate::blocking(|| {
            // The projection owns its schema, so a reset starts from an empty file.
            let fresh =
                open(&self.path.with_extension("resetting")).map_err(|source| self.sql(source))?;
            drop(std::mem::replace(&mut self.conn, fresh));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
            }
            let mut conn = open(&self.path).map_err(|source| self.sql(source))?;
            let tx = conn.transaction().map_err(|source| self.sql(source))?;
            self.projection.setup(&tx).map_err(|source| self.sql(source))?;
            tx.commit().map_err(|source| self.sql(source))?;
            let scratch = std::mem::replace(&mut self.conn, conn);
            drop(scratch);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!(
                    "{}{suffix}",
                    self.path.with_extension("resetting").display()
                ));
            }
            Ok(())
        })
    }
}

fn open_existing(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The checkpoints held by the read model file at `path` (one per projection).
pub fn stored_checkpoints(path: &Path) -> Result<Vec<StoredCheckpoint>, ProjectionError> {
    let sql = |source| ProjectionError::Sqlite { projection: path.display().to_string(), source };
    let conn = open_existing(path).map_err(sql)?;
    let mut stmt = conn
        .prepare(
            "SELECT c.projection, c.position, c.event_time, c.updated_at, COALESCE(k.paused, 0), COALESCE(k.reset, 0), s.source
             FROM cairn_checkpoints c
             LEFT JOIN cairn_control k ON k.projection = c.projection
             LEFT JOIN cairn_sources s ON s.projection = c.projection
             ORDER BY c.projection",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(StoredCheckpoint {
                projection: r.get(0)?,
                position: Position(r.get::<_, i64>(1)? as u64),
                event_time: Timestamp(r.get(2)?),
                updated_at: Timestamp(r.get(3)?),
                requested: Requested { paused: r.get(4)?, reset: r.get(5)? },
                source: r.get::<_, Option<String>>(6)?.and_then(|s| serde_json::from_str(&s).ok()),
            })
        })
        .map_err(sql)?;
    rows.collect::<Result<_, _>>().map_err(sql)
}

/// Stores a request for `projection` in the read model file at `path`; its
/// runner acts on it within a quarter of a second. `paused`: `Some(true)` to
/// pause, `Some(false)` to resume; `reset`: empty the model and replay.
pub fn request(
    path: &Path,
    projection: &str,
    paused: Option<bool>,
    reset: bool,
) -> Result<(), ProjectionError> {
    let sql = |source| ProjectionError::Sqlite { projection: projection.to_string(), source };
    let conn = open_existing(path).map_err(sql)?;
    conn.execute(
        "INSERT INTO cairn_control (projection, paused, reset) VALUES (?1, COALESCE(?2, 0), ?3)
         ON CONFLICT (projection) DO UPDATE SET paused = COALESCE(?2, paused), reset = MAX(reset, ?3)",
        params![projection, paused, reset],
    )
    .map_err(sql)?;
    Ok(())
}

use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

/// The table of processed message ids, per consumer.
pub const INBOX_TABLE: &str = "cairn_processed_messages";

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled<T> {
    /// The handler ran and its effect committed with the message's id.
    Applied(T),
    /// The message was processed before; nothing ran.
    Duplicate,
}

/// Records processed messages in PostgreSQL, one consumer per name.
#[derive(Debug, Clone)]
pub struct PgInbox {
    consumer: String,
}

impl PgInbox {
    /// Creates the table if needed. Safe when several processes start at
    /// once: `CREATE TABLE IF NOT EXISTS` alone is not, so it runs under an
    /// advisory lock.
    pub async fn setup(client: &Client) -> Result<(), tokio_postgres::Error> {
        client
            .batch_execute(&format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(hashtext('{INBOX_TABLE}'));
                 CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
                     consumer TEXT NOT NULL,
                     message_id UUID NOT NULL,
                     processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                     PRIMARY KEY (consumer, message_id)
                 );
                 COMMIT;"
            ))
            .await
    }

    pub fn new(consumer: impl Into<String>) -> Self {
        PgInbox { consumer: consumer.into() }
    }

    /// Runs `handler` for `message_id` inside one transaction with the record
    /// that the message was processed, unless it already was. If the handler
    /// fails, nothing commits and a redelivery runs it again. Two deliveries
    /// racing: one applies, the other waits on the first's row and then sees a
    /// duplicate.
    pub async fn handle<T, E>(
        &self,
        client: &mut Client,
        message_id: Uuid,
        handler: impl AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<Handled<T>, E>
    where
        E: From<tokio_postgres::Error>,
    {
        let tx = client.transaction().await?;
        let inserted = tx
            .execute(
                &format!("INSERT INTO {INBOX_TABLE} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                &[&self.consumer, &message_id],
            )
            .await?;
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(Handled::Duplicate);
        }
        let value = handler(&tx).await?;
        tx.commit().await?;
        Ok(Handled::Applied(value))
    }

    /// Whether `message_id` was processed by this consumer.
    pub async fn seen(
        &self,
        client: &Client,
        message_id: Uuid,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = client
            .query_opt(
                &format!("SELECT 1 FROM {INBOX_TABLE} WHERE consumer = $1 AND message_id = $2"),
                &[&self.consumer, &message_id],
            )
            .await?;
        Ok(row.is_some())
    }
}

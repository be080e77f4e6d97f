//! Live subscriptions: catch up page by page through the gap-free reads,
//! then wait for a wake-up. Appends in this process wake subscribers
//! directly; appends in other processes arrive as NOTIFY on
//! `cairn_<schema>` (sent after each append here, coalesced, by the notifier
//! task; sent inside the transaction by [`crate::PgStore::append_in`]). A
//! subscriber also looks again every `poll_interval`, in case a
//! notification was lost with a connection.

use std::sync::{Arc, Weak};
use std::time::Duration;

use cairn_core::{
    Position, RecordedEvent, Result, StartFrom, StoreError, Subscription, SubscriptionTarget,
};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::query::QuerySql;
use crate::read::{self, check_read_name};
use crate::{Inner, db_error};

const PAGE: usize = 512;

/// Starts the LISTEN connection and the notifier for a store.
pub(crate) fn spawn(inner: Weak<Inner>, config: tokio_postgres::Config) {
    let Some(strong) = inner.upgrade() else { return };
    let channel = strong.listen_channel();
    let mut closed = strong.closed.subscribe();
    drop(strong);
    let notifier = inner.clone();
    tokio::spawn(async move {
        // Jittered: servers that lost the same database do not all reconnect at once.
        let pause = cairn_core::Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
            .with_jitter(0.3);
        let mut failures = 0u32;
        loop {
            if let Err(e) = listen(&inner, &config, &channel, &mut closed).await {
                let _ = e; // polling covers the outage; try again after a pause
            }
            if *closed.borrow() || inner.strong_count() == 0 {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause.delay(failures)) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            failures = failures.saturating_add(1);
        }
    });
    tokio::spawn(async move { notify_loop(notifier).await });
}

/// One LISTEN connection, until it fails or the store closes.
async fn listen(
    inner: &Weak<Inner>,
    config: &tokio_postgres::Config,
    channel: &str,
    closed: &mut tokio::sync::watch::Receiver<bool>,
) -> std::result::Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message
                && tx.send(()).is_err()
            {
                return;
            }
        }
    });
    client.batch_execute(&format!("LISTEN {}", crate::schema::ident(channel))).await?;
    // Anything appended while no one listened: look now.
    wake(inner);
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(()) => wake(inner),
                None => return Ok(()), // the connection ended
            },
            _ = closed.wait_for(|c| *c) => return Ok(()),
        }
    }
}

fn wake(inner: &Weak<Inner>) {
    if let Some(inner) = inner.upgrade() {
        inner.wake.send_modify(|n| *n += 1);
    }
}

/// Tells other processes about this one's appends: one NOTIFY per burst.
async fn notify_loop(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let mut closed = strong.closed.subscribe();
        tokio::select! {
            _ = strong.notify.notified() => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let channel = strong.listen_channel();
        if let Ok(client) = strong.pool.get().await {
            let _ = client.execute("SELECT pg_notify($1, '')", &[&channel]).await;
        }
    }
}

enum Cursor {
    Stream(String, u64),
    All(u64),
    Query(Box<QuerySql>, u64),
}

pub(crate) async fn subscribe(
    inner: Arc<Inner>,
    target: SubscriptionTarget,
    from: StartFrom,
) -> Result<Subscription> {
    let cursor = match target {
        SubscriptionTarget::Stream(stream) => {
            check_read_name(&stream)?;
            let after = match from {
                StartFrom::Start => 0,
                StartFrom::After(v) => v,
                StartFrom::End => {
                    read::stream_info(&inner, &stream).await?.map_or(0, |i| i.version)
                }
            };
            Cursor::Stream(stream, after)
        }
        SubscriptionTarget::All => Cursor::All(start_position(&inner, from).await?),
        SubscriptionTarget::Query(query) => {
            inner.options.limits.check_query(&query)?;
            let after = start_position(&inner, from).await?;
            Cursor::Query(Box::new(QuerySql::new(&query, 1)), after)
        }
        other => {
            return Err(StoreError::InvalidArgument(format!(
                "subscriptions to {other:?} are not supported"
            )));
        }
    };
    let (tx, rx) = mpsc::channel(PAGE);
    tokio::spawn(follow(inner, cursor, tx));
    Ok(Subscription::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    })))
}

async fn start_position(inner: &Inner, from: StartFrom) -> Result<u64> {
    match from {
        StartFrom::Start => Ok(0),
        StartFrom::End => read::final_head(inner).await,
        StartFrom::After(p) => {
            let head = read::final_head(inner).await?;
            if p > head + 1 {
                return Err(StoreError::InvalidPosition(Position(p)));
            }
            Ok(p)
        }
    }
}

async fn follow(inner: Arc<Inner>, mut cursor: Cursor, tx: mpsc::Sender<Result<RecordedEvent>>) {
    let mut wake = inner.wake.subscribe();
    let mut closed = inner.closed.subscribe();
    let mut failures = 0u32;
    loop {
        wake.borrow_and_update();
        let page = page(&inner, &cursor).await;
        match page {
            Ok(events) if events.is_empty() => {
                failures = 0;
                tokio::select! {
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(inner.options.poll_interval) => {}
                    _ = tx.closed() => return,
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
            Ok(events) => {
                failures = 0;
                for e in events {
                    match &mut cursor {
                        Cursor::Stream(_, v) => *v = e.version,
                        Cursor::All(p) | Cursor::Query(_, p) => *p = e.position.0,
                    }
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
            // A lost connection: try again for a while before giving up.
            Err(StoreError::Io { .. }) if failures < 10 => {
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100 << failures.min(5))) => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
        if *closed.borrow() {
            return;
        }
    }
}

async fn page(inner: &Inner, cursor: &Cursor) -> Result<Vec<RecordedEvent>> {
    match cursor {
        Cursor::All(after) => read::read_all_forward(inner, *after, PAGE).await,
        Cursor::Query(q, after) => read::read_query_forward(inner, q, *after, PAGE).await,
        Cursor::Stream(stream, after) => {
            let client = inner.pool.get().await.map_err(|e| db_error(&inner.place, e))?;
            let rows = read::rows(
                inner,
                &client,
                &inner.sql.stream_page,
                &[stream, &crate::clamp(*after), &(PAGE as i64)],
            )
            .await?;
            rows.iter().map(|r| read::event(r, 0)).collect()
        }
    }
}

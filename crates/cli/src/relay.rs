//! `cairn relay`: publishes the store's events to NATS JetStream or RabbitMQ,
//! in order, at least once, from a checkpoint kept in the store, until
//! Ctrl-C or SIGTERM. Prints its figures (published, pending, oldest
//! unpublished age) every few seconds.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use cairn_relay::{NatsSink, RabbitSink, Relay, RelayConfig, RelayHandle};
use clap::Args;

use crate::commands::Context;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SinkKind {
    /// NATS JetStream: subjects `<prefix>.<category>.<type>`, Nats-Msg-Id = event id (JetStream drops repeats).
    Nats,
    /// RabbitMQ: a durable topic exchange, routing key `<category>.<type>`, message_id = event id, publisher confirms.
    Rabbitmq,
}

#[derive(Args)]
pub(crate) struct RelayArgs {
    /// Where events go.
    #[arg(long, value_enum)]
    sink: SinkKind,
    /// Names the relay's checkpoint (`$relay-<name>` in the store) [default: the sink's name].
    #[arg(long)]
    name: Option<String>,
    /// Most events per publish.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// NATS server.
    #[arg(long, env = "CAIRN_NATS_URL", default_value = "127.0.0.1:4222")]
    nats_url: String,
    /// NATS subject prefix.
    #[arg(long, default_value = "cairn")]
    subject_prefix: String,
    /// The JetStream stream that captures `<prefix>.>` (created if missing).
    #[arg(long, default_value = "CAIRN")]
    jetstream: String,
    /// RabbitMQ broker.
    #[arg(
        long,
        env = "CAIRN_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// RabbitMQ topic exchange (declared durable).
    #[arg(long, default_value = "cairn")]
    exchange: String,
    /// Declare QUEUE and bind it with PATTERN (`order.*`, `*.PaymentFailed`, `#`), repeatable:
    /// one queue per consuming service.
    #[arg(long = "bind", value_name = "QUEUE=PATTERN")]
    binds: Vec<String>,
    /// Seconds between status lines (0: none).
    #[arg(long, default_value_t = 5)]
    status_every: u64,
}

pub(crate) async fn run(ctx: &Context, args: RelayArgs) -> Result<()> {
    let store = ctx.store(true).await?;
    let kind = match args.sink {
        SinkKind::Nats => "nats",
        SinkKind::Rabbitmq => "rabbitmq",
    };
    let name = args.name.clone().unwrap_or_else(|| kind.to_string());
    cairn_core::validate_stream_name(&name).map_err(|e| anyhow!("--name: {e}"))?;
    let config = RelayConfig::new(&name).batch(args.batch);
    let relay = match args.sink {
        SinkKind::Nats => {
            let client = async_nats::connect(&args.nats_url).await.with_context(|| {
                format!(
                    "cannot reach NATS at {}; is nats-server running (with -js)?",
                    args.nats_url
                )
            })?;
            let sink = NatsSink::new(client, &args.subject_prefix);
            sink.ensure_stream(&args.jetstream).await.map_err(|e| anyhow!("{}", e.0))?;
            println!(
                "cairn relay: to NATS JetStream at {} (subjects {}.>, stream {})",
                args.nats_url, args.subject_prefix, args.jetstream
            );
            Relay::new(store, config, sink).spawn()
        }
        SinkKind::Rabbitmq => {
            let mut sink =
                RabbitSink::new(&args.amqp_url, &args.exchange).map_err(|e| anyhow!("{}", e.0))?;
            for bind in &args.binds {
                let Some((queue, pattern)) = bind.split_once('=') else {
                    bail!("--bind {bind:?}: write QUEUE=PATTERN, e.g. shipping=order.*");
                };
                sink.bind_queue(queue, pattern).await.map_err(|e| {
                    anyhow!("{}; is RabbitMQ running at {}?", e.0, redact(&args.amqp_url))
                })?;
            }
            println!(
                "cairn relay: to RabbitMQ at {} (exchange {})",
                redact(&args.amqp_url),
                args.exchange
            );
            Relay::new(store, config, sink).spawn()
        }
    };
    println!("  checkpoint in $relay-{name}; stop: Ctrl-C");
    let mut every = tokio::time::interval(Duration::from_secs(args.status_every.max(1)));
    every.tick().await;
    let stopping = crate::serve::shutdown_signal();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => break,
            _ = every.tick(), if args.status_every > 0 => print_status(ctx, &relay).await,
        }
    }
    eprintln!("cairn relay: stopping (the batch in hand is finished first)");
    let last = relay.status();
    relay.stop().await.context("the relay stopped with an error")?;
    eprintln!(
        "cairn relay: stopped at position {} after {} events",
        last.checkpoint.map_or("none".into(), |p| p.to_string()),
        last.published
    );
    Ok(())
}

async fn print_status(ctx: &Context, relay: &RelayHandle) {
    let s = relay.status();
    let (pending, oldest) = relay.pending().await.unwrap_or((0, Duration::ZERO));
    let checkpoint = s.checkpoint.map_or("none".to_string(), |p| p.to_string());
    if ctx.json {
        let line = serde_json::json!({
            "published": s.published, "pending": pending, "oldest_pending_ms": oldest.as_millis() as u64,
            "checkpoint": s.checkpoint.map(|p| p.0), "retries": s.retries, "error": s.error,
        });
        // A closed stdout (a pipe whose reader left) must not stop the relay.
        let _ = writeln!(std::io::stdout(), "{line}");
    } else {
        let error = s.error.map(|e| format!(", failing: {e}")).unwrap_or_default();
        let _ = writeln!(
            std::io::stdout(),
            "published {}, pending {pending} (oldest {:.1}s), checkpoint {checkpoint}, retries {}{error}",
            s.published,
            oldest.as_secs_f64(),
            s.retries
        );
    }
}

/// A URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

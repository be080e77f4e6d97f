//! `cairn serve`: the embedded store in `--data` behind the HTTP API until
//! Ctrl-C or SIGTERM, then a graceful stop (appends in flight finish).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use cairn_core::EventStore;
use cairn_server::ServerConfig;
use clap::Args;

use crate::commands::Context;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. Only loopback until authentication exists.
    #[arg(long, default_value = "127.0.0.1:8720", env = "CAIRN_LISTEN", value_name = "HOST:PORT")]
    listen: SocketAddr,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 128 * 1024 * 1024, env = "CAIRN_BODY_LIMIT", value_name = "BYTES")]
    body_limit: usize,
    /// Into a data directory with no store yet, run the tour first, then serve what it wrote.
    #[arg(long)]
    demo: bool,
}

pub async fn run(ctx: &Context, args: ServeArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {}: the server has no authentication yet, so it only listens on loopback; use --listen 127.0.0.1:{}",
            args.listen,
            args.listen.port()
        );
    }
    if args.demo {
        if ctx.data.join("log").exists() {
            println!("{} already holds a store: serving it as it is (the tour runs only into a fresh directory)", ctx.data.display());
        } else {
            crate::tour::run(Some(ctx.data.clone())).await?;
            println!();
        }
    }
    let store = ctx.open()?;
    let stats = store.clone();
    let engine_metrics: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || stats.stats().prometheus());
    let head = store.head_position().await?;
    let store: Arc<dyn EventStore> = Arc::new(store);
    let config = ServerConfig { listen: args.listen, body_limit: args.body_limit, engine_metrics: Some(engine_metrics) };
    let running = cairn_server::start(store, config).with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("cairn serve: http://{} (data in {}, head at position {head})", running.addr, ctx.data.display());
    println!("  try: curl http://{}/streams   ·   the API: /openapi.json   ·   stop: Ctrl-C", running.addr);
    let stop = running.stopper();
    tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!("cairn serve: stopping (letting appends in flight finish)");
        let _ = stop.send(true);
    });
    running.wait().await.context("the server stopped with an error")?;
    eprintln!("cairn serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

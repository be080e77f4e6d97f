//! `cairn serve`: the embedded store in `--data` behind the HTTP API until
//! Ctrl-C or SIGTERM, then a graceful stop (appends in flight finish).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use cairn_core::EventStore;
use cairn_server::auth::{KeyFile, Role};
use cairn_server::ServerConfig;
use clap::Args;

use crate::commands::Context;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback needs API keys (`cairn keys add`).
    #[arg(long, default_value = "127.0.0.1:8720", env = "CAIRN_LISTEN", value_name = "HOST:PORT")]
    listen: SocketAddr,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 128 * 1024 * 1024, env = "CAIRN_BODY_LIMIT", value_name = "BYTES")]
    body_limit: usize,
    /// Into a data directory with no store yet, run the tour first, then serve what it wrote.
    #[arg(long)]
    demo: bool,
    /// The API key file [default: DATA/keys.json]. With keys in it, every request needs one.
    #[arg(long, env = "CAIRN_KEYS", value_name = "FILE")]
    keys: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "CAIRN_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "CAIRN_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

pub async fn run(ctx: &Context, args: ServeArgs) -> Result<()> {
    let key_path = args.keys.clone().unwrap_or_else(|| KeyFile::default_path(&ctx.data));
    let keys = KeyFile::load(&key_path).map_err(anyhow::Error::msg)?;
    if keys.keys.is_empty() && !args.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without authentication: create an API key first (`cairn keys add NAME --role admin`, stored in {}), or listen on loopback (--listen 127.0.0.1:{})",
            args.listen,
            key_path.display(),
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
    let secured = !keys.keys.is_empty();
    let tls = args.tls_cert.zip(args.tls_key).map(|(cert, key)| cairn_server::TlsFiles { cert, key });
    if secured && tls.is_none() && !args.listen.ip().is_loopback() {
        eprintln!("warning: API keys will cross the network in clear text; give --tls-cert and --tls-key to serve HTTPS");
    }
    let config = ServerConfig { listen: args.listen, body_limit: args.body_limit, keys: Some(keys), tls, engine_metrics: Some(engine_metrics) };
    let running = cairn_server::start(store, config).with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("cairn serve: {} (data in {}, head at position {head})", running.url, ctx.data.display());
    if secured {
        println!("  API keys from {} are required (Authorization: Bearer <key>)", key_path.display());
    } else {
        println!("  no API keys: open to this machine only");
    }
    println!("  try: curl {}/streams   ·   the API: /openapi.json   ·   stop: Ctrl-C", running.url);
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

#[derive(Args)]
pub struct KeysArgs {
    /// The key file [default: DATA/keys.json].
    #[arg(long, global = true, env = "CAIRN_KEYS", value_name = "FILE")]
    file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(clap::Subcommand)]
enum KeysAction {
    /// Make a key and print it once (only its hash is stored). A running server reads keys at start.
    Add {
        name: String,
        /// admin (everything), writer (read and write) or reader.
        #[arg(long)]
        role: Role,
        /// Limit the key to streams starting with this (repeatable).
        #[arg(long = "prefix", value_name = "PREFIX")]
        prefixes: Vec<String>,
    },
    /// The keys, without secrets.
    List,
    /// Remove a key (takes effect when the server next starts).
    Remove { name: String },
}

pub fn keys(ctx: &Context, args: KeysArgs) -> Result<()> {
    let path = args.file.unwrap_or_else(|| KeyFile::default_path(&ctx.data));
    let mut file = KeyFile::load(&path).map_err(anyhow::Error::msg)?;
    match args.action {
        KeysAction::Add { name, role, prefixes } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let token = file.add(&name, role, prefixes).map_err(anyhow::Error::msg)?;
            file.save(&path).map_err(anyhow::Error::msg)?;
            println!("{token}");
            eprintln!("key '{name}' added to {}; this is the only time the key is shown. Restart the server to use it.", path.display());
        }
        KeysAction::List => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED).set_header(["key", "role", "streams"]);
            for k in &file.keys {
                let scope = if k.prefixes.is_empty() { "all".to_string() } else { k.prefixes.join(", ") };
                table.add_row([k.name.clone(), format!("{:?}", k.role).to_lowercase(), scope]);
            }
            println!("{table}");
            println!("{} in {}", crate::output::count(file.keys.len() as u64, "key"), path.display());
        }
        KeysAction::Remove { name } => {
            if !file.remove(&name) {
                bail!("no key named '{name}' in {}; `cairn keys list` shows them", path.display());
            }
            file.save(&path).map_err(anyhow::Error::msg)?;
            println!("removed key '{name}'; restart the server for it to take effect");
        }
    }
    Ok(())
}

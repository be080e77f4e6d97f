//! `cairn serve`: the embedded store in `--data` behind the HTTP API until
//! Ctrl-C or SIGTERM, then a graceful stop (appends in flight get up to 10 s).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use cairn_core::EventStore;
use cairn_server::ServerConfig;
use cairn_server::auth::{KeyFile, Role};
use clap::Args;

use crate::commands::{Backend, Context};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// A TOML file with any of: listen, data, body_limit, keys, tls_cert, tls_key
    /// (paths relative to the file). Flags and CAIRN_* variables win over it.
    #[arg(long, env = "CAIRN_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8720]. Anything but loopback needs API keys (`cairn keys add`).
    #[arg(long, env = "CAIRN_LISTEN", value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Largest request body in bytes [default: 92274688, 88 MiB: an append at the store's 64 MiB limit,
    /// binary data in base64, plus its JSON]. A body declared larger gets 413 before any of it is read.
    #[arg(long, env = "CAIRN_BODY_LIMIT", value_name = "BYTES")]
    body_limit: Option<usize>,
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

/// `cairn serve --config FILE`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    body_limit: Option<usize>,
    keys: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

impl ConfigFile {
    fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let mut file: ConfigFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("the config file {} is not valid: {e}", path.display()))?;
        // Paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut file.data, &mut file.keys, &mut file.tls_cert, &mut file.tls_key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if file.tls_cert.is_some() != file.tls_key.is_some() {
            bail!(
                "the config file {} gives one of tls_cert and tls_key; HTTPS needs both",
                path.display()
            );
        }
        Ok(file)
    }
}

/// `println!` for a long-running server: a closed stdout (`cairn serve |
/// head -1`) must not bring it down, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr, as `say!`.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) async fn run(ctx: &Context, args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let mut ctx = ctx.clone();
    if ctx.data_is_default
        && let Some(data) = file.data.clone()
    {
        ctx.data = data;
    }
    let ctx = &ctx;
    let args = ServeArgs {
        listen: Some(
            args.listen.or(file.listen).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8720))),
        ),
        body_limit: Some(args.body_limit.or(file.body_limit).unwrap_or(cairn_server::BODY_LIMIT)),
        keys: args.keys.or(file.keys),
        tls_cert: args.tls_cert.or(file.tls_cert),
        tls_key: args.tls_key.or(file.tls_key),
        ..args
    };
    let listen = args.listen.expect("resolved above");
    let body_limit = args.body_limit.expect("resolved above");
    let key_path = args.keys.clone().unwrap_or_else(|| KeyFile::default_path(&ctx.data));
    let keys = KeyFile::load(&key_path).map_err(anyhow::Error::msg)?;
    if keys.keys.is_empty() && !listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without authentication: create an API key first (`cairn keys add NAME --role admin`, stored in {}), or listen on loopback (--listen 127.0.0.1:{})",
            listen,
            key_path.display(),
            listen.port()
        );
    }
    let (store, engine_metrics, place): (
        Arc<dyn EventStore>,
        Option<Arc<cairn_server::EngineMetrics>>,
        String,
    ) = match ctx.backend {
        Backend::Embedded => {
            if args.demo {
                if ctx.data.join("log").exists() {
                    println!(
                        "{} already holds a store: serving it as it is (the tour runs only into a fresh directory)",
                        ctx.data.display()
                    );
                } else {
                    crate::tour::run(Some(ctx.data.clone())).await?;
                    println!();
                }
            }
            let store = ctx.open()?;
            let stats = store.clone();
            let metrics: Arc<dyn Fn() -> String + Send + Sync> =
                Arc::new(move || stats.stats().prometheus());
            (Arc::new(store), Some(metrics), format!("data in {}", ctx.data.display()))
        }
        Backend::Postgres => {
            if args.demo {
                println!(
                    "note: --demo runs the tour on the embedded engine only; serving PostgreSQL as it is"
                );
            }
            let store = ctx.postgres().await?;
            let place = format!("PostgreSQL schema {}", store.schema());
            (Arc::new(store), None, place)
        }
    };
    let head = store.head_position().await?;
    let secured = !keys.keys.is_empty();
    let tls =
        args.tls_cert.zip(args.tls_key).map(|(cert, key)| cairn_server::TlsFiles { cert, key });
    if secured && tls.is_none() && !listen.ip().is_loopback() {
        say_err!(
            "warning: API keys will cross the network in clear text; give --tls-cert and --tls-key to serve HTTPS"
        );
    }
    let config = ServerConfig {
        listen,
        body_limit,
        keys: Some(keys),
        tls,
        engine_metrics,
        ..ServerConfig::default()
    };
    let grace = config.shutdown_grace.as_secs();
    let running =
        cairn_server::start(store, config).with_context(|| format!("cannot listen on {listen}"))?;
    say!("cairn serve: {} ({place}, head at position {head})", running.url);
    match cairn_server::raise_fd_limit() {
        Some(files) if files.now > files.was => say!(
            "  open-file limit raised from {} to {}; at most {} connections",
            files.was,
            files.now,
            running.max_connections
        ),
        _ => say!("  at most {} connections", running.max_connections),
    }
    if secured {
        say!("  API keys from {} are required (Authorization: Bearer <key>)", key_path.display());
    } else {
        say!("  no API keys: open to this machine only");
    }
    say!("  try: curl {}/streams   ·   the API: /openapi.json   ·   stop: Ctrl-C", running.url);
    let stop = running.stopper();
    tokio::spawn(async move {
        shutdown_signal().await;
        say_err!("cairn serve: stopping (appends in flight get up to {grace} s to finish)");
        let _ = stop.send(true);
    });
    running.wait().await.context("the server stopped with an error")?;
    say_err!("cairn serve: stopped");
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
pub(crate) struct KeysArgs {
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

pub(crate) fn keys(ctx: &Context, args: KeysArgs) -> Result<()> {
    let path = args.file.unwrap_or_else(|| KeyFile::default_path(&ctx.data));
    let mut file = KeyFile::load(&path).map_err(anyhow::Error::msg)?;
    match args.action {
        KeysAction::Add { name, role, prefixes } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let token = file.add(&name, role, prefixes).map_err(anyhow::Error::msg)?;
            file.save(&path).map_err(anyhow::Error::msg)?;
            println!("{token}");
            eprintln!(
                "key '{name}' added to {}; this is the only time the key is shown. Restart the server to use it.",
                path.display()
            );
        }
        KeysAction::List => {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(["key", "role", "streams"]);
            for k in &file.keys {
                let scope =
                    if k.prefixes.is_empty() { "all".to_string() } else { k.prefixes.join(", ") };
                table.add_row([k.name.clone(), format!("{:?}", k.role).to_lowercase(), scope]);
            }
            println!("{table}");
            println!(
                "{} in {}",
                crate::output::count(file.keys.len() as u64, "key"),
                path.display()
            );
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

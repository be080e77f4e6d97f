//! `cairn projections` and `cairn groups`: what operators ask of the read side.
//! Projections are read through their SQLite read model files (checkpoint,
//! requests); consumer groups through their streams in the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cairn_core::{EventStore, Position, StoreError, Timestamp};
use cairn_cqrs::{Lag, Source, StoredCheckpoint};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;

use crate::commands::Context;
use crate::output::count;

#[derive(Args)]
pub(crate) struct ProjectionsArgs {
    /// Directory of the SQLite read model files [default: DATA/read-models].
    #[arg(long, global = true, value_name = "DIR")]
    models: Option<PathBuf>,
    #[command(subcommand)]
    action: ProjectionsAction,
}

#[derive(Subcommand)]
enum ProjectionsAction {
    /// A table of every projection in the read model files: position, lag in events and seconds, health, requests.
    Status {
        /// Read model files to look at [default: every *.db in the models directory].
        files: Vec<PathBuf>,
        /// Lag above this many seconds is unhealthy.
        #[arg(long, default_value = "5", value_name = "SECONDS")]
        alert: f64,
    },
    /// Ask a projection's runner to stop applying events (it acts within a quarter of a second).
    Pause { name: String },
    /// Ask a paused projection's runner to carry on from its checkpoint.
    Resume { name: String },
    /// Ask a projection's runner to empty its read model and replay every event into it.
    Reset { name: String },
}

#[derive(Args)]
pub(crate) struct GroupsArgs {
    #[command(subcommand)]
    action: GroupsAction,
}

#[derive(Subcommand)]
enum GroupsAction {
    /// A table of every consumer group: checkpoint, lag, parked events.
    Status {
        /// Lag above this many seconds is unhealthy.
        #[arg(long, default_value = "5", value_name = "SECONDS")]
        alert: f64,
    },
    /// The events a group parked, with their errors.
    Parked { group: String },
    /// Deliver a group's parked events again when it next starts.
    Replay { group: String },
}

/// The store, when this process can open it: a running server holds its lock.
fn store_if_free(ctx: &Context) -> Result<Option<cairn_log::EmbeddedStore>, String> {
    match ctx.open_existing() {
        Ok(store) => Ok(Some(store)),
        Err(e) => match e.downcast_ref::<StoreError>() {
            Some(StoreError::Locked { .. }) => {
                Err("the store is open in another process (a running server?): lag unknown".into())
            }
            _ => Err(format!("{e:#}")),
        },
    }
}

fn alert(seconds: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| anyhow::anyhow!("--alert {seconds}: give a number of seconds, 0 or more"))
}

fn describe(source: &Option<Source>) -> String {
    match source {
        None => "?".into(),
        Some(Source::All) => "$all".into(),
        Some(Source::Query(q)) => q
            .items
            .iter()
            .map(|item| {
                let mut parts = Vec::new();
                if !item.categories.is_empty() {
                    parts.push(format!("category {}", item.categories.join("|")));
                }
                if !item.types.is_empty() {
                    parts.push(format!("type {}", item.types.join("|")));
                }
                if !item.tags.is_empty() {
                    parts.push(format!("tags {}", item.tags.join("+")));
                }
                if parts.is_empty() { "every user event".to_string() } else { parts.join(", ") }
            })
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

fn age(t: Timestamp) -> String {
    let secs = (Timestamp::now().0 - t.0).max(0) / 1_000_000;
    humantime::format_duration(Duration::from_secs(secs as u64)).to_string() + " ago"
}

fn lag_cells(lag: &Result<Lag, String>) -> [String; 4] {
    match lag {
        Ok(l) => [
            l.head.map_or("-".into(), |p| p.0.to_string()),
            l.events.to_string(),
            format!("{:.1} s", l.seconds),
            if l.healthy { "ok".into() } else { "UNHEALTHY".into() },
        ],
        Err(_) => ["?".into(), "?".into(), "?".into(), "?".into()],
    }
}

fn lag_json(lag: &Result<Lag, String>) -> serde_json::Value {
    match lag {
        Ok(l) => {
            json!({"head": l.head.map(|p| p.0), "behind_events": l.events, "behind_seconds": l.seconds, "healthy": l.healthy})
        }
        Err(e) => json!({"lag_error": e}),
    }
}

async fn lag_of(
    store: &Result<Option<&dyn EventStore>, String>,
    source: &Option<Source>,
    at: Option<(Position, Timestamp)>,
    alert: Duration,
) -> Result<Lag, String> {
    let store = match store {
        Ok(Some(store)) => *store,
        Ok(None) => return Err("no store".into()),
        Err(e) => return Err(e.clone()),
    };
    let Some(source) = source else {
        return Err(
            "the read model does not say what it follows (written by an older Cairn)".into()
        );
    };
    cairn_cqrs::lag(store, source, at.map(|c| c.0), at.map(|c| c.1), alert)
        .await
        .map_err(|e| e.to_string())
}

/// The read model files to look at: those given, or every `*.db` in the models directory.
fn model_files(ctx: &Context, dir: &Option<PathBuf>, given: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given);
    }
    let dir = dir.clone().unwrap_or_else(|| cairn_cqrs::read_models_dir(&ctx.data));
    let entries = std::fs::read_dir(&dir).with_context(|| {
        format!("no read models in {}: pass their files, or --models DIR", dir.display())
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "db"))
        .collect();
    files.sort();
    Ok(files)
}

fn checkpoints(file: &Path) -> Result<Vec<StoredCheckpoint>> {
    if !file.is_file() {
        bail!("{} is not a file", file.display());
    }
    cairn_cqrs::stored_checkpoints(file)
        .with_context(|| format!("{} is not a Cairn read model", file.display()))
}

pub(crate) async fn projections(ctx: &Context, args: ProjectionsArgs) -> Result<()> {
    let (name, paused, reset) = match args.action {
        ProjectionsAction::Status { files, alert: seconds } => {
            return projections_status(
                ctx,
                model_files(ctx, &args.models, files)?,
                alert(seconds)?,
            )
            .await;
        }
        ProjectionsAction::Pause { name } => (name, Some(true), false),
        ProjectionsAction::Resume { name } => (name, Some(false), false),
        ProjectionsAction::Reset { name } => (name, None, true),
    };
    let files = model_files(ctx, &args.models, Vec::new())?;
    let mut holders = Vec::new();
    for file in &files {
        if checkpoints(file).is_ok_and(|rows| rows.iter().any(|r| r.projection == name)) {
            holders.push(file.clone());
        }
    }
    let file = match holders.as_slice() {
        [one] => one,
        [] => bail!(
            "no projection named '{name}' in {} read model files; `cairn projections status` lists them",
            files.len()
        ),
        many => bail!(
            "'{name}' is in several files ({}); pass --models with the directory of the one you mean",
            many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    cairn_cqrs::request(file, &name, paused, reset)?;
    let what = if reset {
        "reset (empty the model, replay from the start)"
    } else if paused == Some(true) {
        "pause"
    } else {
        "resume"
    };
    println!(
        "asked '{name}' in {} to {what}; its runner acts within a quarter of a second",
        file.display()
    );
    Ok(())
}

async fn projections_status(ctx: &Context, files: Vec<PathBuf>, alert: Duration) -> Result<()> {
    let opened = store_if_free(ctx);
    let store =
        opened.as_ref().map(|s| s.as_ref().map(|s| s as &dyn EventStore)).map_err(Clone::clone);
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "projection",
        "file",
        "follows",
        "position",
        "head",
        "behind",
        "lag",
        "health",
        "requested",
        "updated",
    ]);
    let mut rows = 0u64;
    for file in &files {
        for row in checkpoints(file)? {
            let lag =
                lag_of(&store, &row.source, Some((row.position, row.event_time)), alert).await;
            let requested = match (row.requested.paused, row.requested.reset) {
                (_, true) => "reset",
                (true, _) => "paused",
                _ => "",
            };
            rows += 1;
            if ctx.json {
                let mut line = json!({
                    "projection": row.projection, "file": file, "follows": row.source, "position": row.position.0,
                    "event_time": row.event_time.to_rfc3339(), "updated_at": row.updated_at.to_rfc3339(),
                    "paused": row.requested.paused, "reset_requested": row.requested.reset,
                });
                line.as_object_mut()
                    .expect("an object")
                    .extend(lag_json(&lag).as_object().cloned().unwrap_or_default());
                println!("{line}");
                continue;
            }
            let [head, behind, seconds, health] = lag_cells(&lag);
            let name = file
                .file_name()
                .map_or(file.display().to_string(), |n| n.to_string_lossy().into_owned());
            table.add_row([
                row.projection,
                name,
                describe(&row.source),
                row.position.0.to_string(),
                head,
                behind,
                seconds,
                health,
                requested.into(),
                age(row.updated_at),
            ]);
        }
    }
    if !ctx.json {
        println!("{table}");
        println!(
            "{} in {}",
            count(rows, "projection"),
            count(files.len() as u64, "read model file")
        );
        if let Err(why) = &store {
            println!("note: {why}");
        }
    }
    Ok(())
}

pub(crate) async fn groups(ctx: &Context, args: GroupsArgs) -> Result<()> {
    let store = ctx.store(false).await?;
    let store = store.as_ref();
    match args.action {
        GroupsAction::Status { alert: seconds } => {
            let alert = alert(seconds)?;
            let groups = cairn_cqrs::stored_groups(store).await?;
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED).set_header([
                "group",
                "follows",
                "checkpoint",
                "head",
                "behind",
                "lag",
                "health",
                "parked",
                "replay asked",
            ]);
            let found = Ok(Some(store));
            for g in &groups {
                let lag = lag_of(&found, &g.source, g.checkpoint, alert).await;
                if ctx.json {
                    let mut line = json!({"group": g.name, "follows": g.source, "checkpoint": g.checkpoint.map(|c| c.0 .0), "parked": g.parked.len(), "replay_pending": g.replay_pending});
                    line.as_object_mut()
                        .expect("an object")
                        .extend(lag_json(&lag).as_object().cloned().unwrap_or_default());
                    println!("{line}");
                    continue;
                }
                let [head, behind, seconds, health] = lag_cells(&lag);
                let checkpoint = g.checkpoint.map_or("-".into(), |c| c.0.0.to_string());
                table.add_row([
                    g.name.clone(),
                    describe(&g.source),
                    checkpoint,
                    head,
                    behind,
                    seconds,
                    health,
                    g.parked.len().to_string(),
                    g.replay_pending.to_string(),
                ]);
            }
            if !ctx.json {
                println!("{table}");
                println!("{}", count(groups.len() as u64, "consumer group"));
            }
        }
        GroupsAction::Parked { group } => {
            let g = find_group(store, &group).await?;
            if g.parked.is_empty() && !ctx.json {
                println!("no events parked by '{group}'");
                return Ok(());
            }
            let mut table = Table::new();
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_header(["entry", "event", "type", "position", "attempts", "parked", "error"]);
            for p in &g.parked {
                if ctx.json {
                    println!(
                        "{}",
                        json!({"entry": p.entry, "stream": p.stream, "version": p.version, "position": p.position.0, "event_id": p.event_id, "type": p.event_type, "attempts": p.attempts, "parked_at": p.parked_at.to_rfc3339(), "error": p.error})
                    );
                    continue;
                }
                table.add_row([
                    p.entry.to_string(),
                    format!("{}@{}", p.stream, p.version),
                    p.event_type.clone(),
                    p.position.0.to_string(),
                    p.attempts.to_string(),
                    age(p.parked_at),
                    p.error.clone(),
                ]);
            }
            if !ctx.json {
                println!("{table}");
                println!(
                    "{} parked by '{group}'; `cairn groups replay {group}` delivers them again",
                    count(g.parked.len() as u64, "event")
                );
            }
        }
        GroupsAction::Replay { group } => {
            find_group(store, &group).await?;
            let n = cairn_cqrs::request_replay(store, &group).await?;
            println!(
                "{} of '{group}' will be delivered again when the group next starts",
                count(n as u64, "parked event")
            );
        }
    }
    Ok(())
}

async fn find_group(store: &dyn EventStore, name: &str) -> Result<cairn_cqrs::StoredGroup> {
    let groups = cairn_cqrs::stored_groups(store).await?;
    let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
    groups.into_iter().find(|g| g.name == name).ok_or_else(|| {
        anyhow::anyhow!("no consumer group named '{name}' in this store (groups: {}); `cairn groups status` lists them", if names.is_empty() { "none".into() } else { names.join(", ") })
    })
}

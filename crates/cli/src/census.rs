//! `cairn census`: how many stored events of each type are at each schema version.

use anyhow::Result;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;

use crate::commands::Context;
use crate::output::count;

pub(crate) async fn run(ctx: &Context) -> Result<()> {
    let store = ctx.store(false).await?;
    let head = store.head_position().await?.0.max(1);
    let bar = indicatif::ProgressBar::new(head);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent}% {msg}")
            .expect("valid template"),
    );
    let c = cairn_domain::census(store.as_ref(), |scanned, at| {
        bar.set_position(at.0);
        bar.set_message(format!("{scanned} events scanned"));
    })
    .await?;
    bar.finish_and_clear();
    if ctx.json {
        for (event_type, versions) in &c.types {
            for (version, events) in versions {
                let share = c.share(event_type, *version);
                println!(
                    "{}",
                    json!({"type": event_type, "schema_version": version, "events": events, "share": share})
                );
            }
        }
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(["type", "schema version", "events", "share of type"]);
    for (event_type, versions) in &c.types {
        for (version, events) in versions {
            table.add_row([
                event_type.clone(),
                format!("v{version}"),
                events.to_string(),
                format!("{:.1}%", 100.0 * c.share(event_type, *version)),
            ]);
        }
    }
    println!("{table}");
    println!("{} of {} types", count(c.events, "event"), c.types.len());
    Ok(())
}

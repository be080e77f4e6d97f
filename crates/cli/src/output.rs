//! How events and streams are shown to people (tables) and scripts (JSON lines).

use cairn_core::{ContentType, RecordedEvent, StoreError, StreamInfo};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

/// An event as JSON, in the shape the HTTP API uses (the same code makes both).
pub(crate) fn event_json(e: &RecordedEvent) -> Value {
    serde_json::to_value(cairn_client::wire::EventOut::from_recorded(e)).unwrap_or(Value::Null)
}

fn data_preview(e: &RecordedEvent) -> String {
    let text = match e.content_type {
        ContentType::Json => String::from_utf8_lossy(&e.data).into_owned(),
        ContentType::Binary => format!("<{} bytes binary>", e.data.len()),
    };
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(59).collect::<String>())
    } else {
        text
    }
}

pub(crate) fn print_events(events: &[RecordedEvent], json: bool) {
    if json {
        for e in events {
            println!("{}", event_json(e));
        }
        return;
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    let tagged = events.iter().any(|e| !e.tags.is_empty());
    let mut header = vec!["position", "stream", "version", "type"];
    if tagged {
        header.push("tags");
    }
    header.extend(["time (UTC)", "data"]);
    table.set_header(header);
    for e in events {
        let time = e.timestamp.to_rfc3339();
        let mut row = vec![
            e.position.to_string(),
            e.stream.clone(),
            e.version.to_string(),
            e.event_type.clone(),
        ];
        if tagged {
            row.push(e.tags.join(" "));
        }
        row.extend([time[..19].replace('T', " "), data_preview(e)]);
        table.add_row(row);
    }
    println!("{table}");
    println!("{}", count(events.len() as u64, "event"));
}

pub(crate) fn print_event_line(e: &RecordedEvent, json: bool) {
    if json {
        println!("{}", event_json(e));
    } else {
        let tags =
            if e.tags.is_empty() { String::new() } else { format!("  [{}]", e.tags.join(" ")) };
        println!(
            "{:>10}  {}@{}  {}{tags}  {}",
            e.position,
            e.stream,
            e.version,
            e.event_type,
            data_preview(e)
        );
    }
}

pub(crate) fn print_streams(streams: &[StreamInfo], json: bool) {
    if json {
        for s in streams {
            println!("{}", serde_json::to_string(s).unwrap_or_default());
        }
        return;
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(["stream", "version", "state", "last position", "metadata"]);
    for s in streams {
        let meta = serde_json::to_string(&s.metadata).unwrap_or_default();
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        table.add_row([
            s.stream.clone(),
            s.version.to_string(),
            state,
            s.last_position.map(|p| p.to_string()).unwrap_or_default(),
            if meta == "{}" { String::new() } else { meta },
        ]);
    }
    println!("{table}");
    println!("{}", count(streams.len() as u64, "stream"));
}

/// "1 event", "3 events".
pub(crate) fn count(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// What to do next, for errors a person can fix.
pub(crate) fn hint(e: &StoreError) -> Option<&'static str> {
    Some(match e {
        StoreError::Locked { .. } => {
            "another cairn process (a server, `cairn tail`, or a bench) has this data directory open; stop it, or pass --data to use another directory"
        }
        StoreError::AccessDenied { .. } => {
            "pass an API key with --api-key (or CAIRN_API_KEY); an admin creates one with `cairn keys add NAME --role ROLE`"
        }
        StoreError::WrongExpectedVersion { .. } => {
            "read the stream again (`cairn read STREAM`) and retry with its current version, or use --expected-version any"
        }
        StoreError::StreamNotFound { .. } => "list the streams with `cairn streams`",
        StoreError::StreamDeleted { .. } => {
            "a tombstoned stream's name cannot be reused; write to a new stream"
        }
        StoreError::Corrupt { file, .. } if file.ends_with(".idx") => {
            "index files are caches of their segment: `cairn reindex` rebuilds them (or delete the file: the next open rebuilds it); no event is lost"
        }
        StoreError::Corrupt { .. } => {
            "run `cairn verify` for a full report; restore the named file from a backup"
        }
        StoreError::InvalidStreamName { .. } => {
            "stream names are 1 to 256 bytes and may not start with '$'"
        }
        StoreError::AppendConditionFailed { .. } => {
            "events the decision did not see match its query; read them again (`cairn query --tag ...`), decide again, and retry with the new position"
        }
        StoreError::InvalidPosition(_) => {
            "positions come from events (`cairn read-all` shows them); use 0 for the start"
        }
        _ => return None,
    })
}

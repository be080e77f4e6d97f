//! The server's counters, rendered in Prometheus' text format at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the append latency histogram, in microseconds.
const APPEND_BUCKETS_US: [u64; 10] =
    [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000];

#[derive(Default)]
pub struct Metrics {
    appends: AtomicU64,
    append_failures: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_buckets: [AtomicU64; APPEND_BUCKETS_US.len()],
    subscriptions: AtomicI64,
    subscriptions_total: AtomicU64,
    requests_4xx: AtomicU64,
    requests_5xx: AtomicU64,
}

impl Metrics {
    pub fn append_ok(&self, events: usize, bytes: usize, took: Duration) {
        let us = took.as_micros() as u64;
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        if let Some(i) = APPEND_BUCKETS_US.iter().position(|&b| us <= b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn append_failed(&self) {
        self.append_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn status(&self, status: u16) {
        match status {
            400..=499 => self.requests_4xx.fetch_add(1, Ordering::Relaxed),
            500..=599 => self.requests_5xx.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Counts a live subscription until the guard is dropped.
    pub fn subscription(self: &std::sync::Arc<Self>) -> SubscriptionGuard {
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        self.subscriptions_total.fetch_add(1, Ordering::Relaxed);
        SubscriptionGuard(self.clone())
    }

    pub fn render(&self, uptime: Duration) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter("cairn_appends_total", "Appends acknowledged.", get(&self.appends));
        counter(
            "cairn_append_failures_total",
            "Appends refused or failed.",
            get(&self.append_failures),
        );
        counter(
            "cairn_appended_events_total",
            "Events in acknowledged appends.",
            get(&self.events),
        );
        counter(
            "cairn_appended_bytes_total",
            "Payload and metadata bytes in acknowledged appends.",
            get(&self.bytes),
        );
        counter(
            "cairn_subscriptions_total",
            "Subscriptions opened.",
            get(&self.subscriptions_total),
        );
        counter(
            "cairn_http_client_errors_total",
            "Requests answered with a 4xx status.",
            get(&self.requests_4xx),
        );
        counter(
            "cairn_http_server_errors_total",
            "Requests answered with a 5xx status.",
            get(&self.requests_5xx),
        );
        let _ = writeln!(
            out,
            "# HELP cairn_subscriptions_active Live subscriptions (Server-Sent Events streams)."
        );
        let _ = writeln!(out, "# TYPE cairn_subscriptions_active gauge");
        let _ = writeln!(
            out,
            "cairn_subscriptions_active {}",
            self.subscriptions.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP cairn_append_seconds Time from receiving an append to its acknowledgement (durable)."
        );
        let _ = writeln!(out, "# TYPE cairn_append_seconds histogram");
        let mut cumulative = 0;
        for (bound, count) in APPEND_BUCKETS_US.iter().zip(&self.latency_buckets) {
            cumulative += get(count);
            let _ = writeln!(
                out,
                "cairn_append_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let _ = writeln!(out, "cairn_append_seconds_bucket{{le=\"+Inf\"}} {}", get(&self.appends));
        let _ =
            writeln!(out, "cairn_append_seconds_sum {}", get(&self.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "cairn_append_seconds_count {}", get(&self.appends));
        let _ = writeln!(
            out,
            "# HELP cairn_uptime_seconds Seconds since the server started.\n# TYPE cairn_uptime_seconds gauge"
        );
        let _ = writeln!(out, "cairn_uptime_seconds {}", uptime.as_secs());
        out
    }
}

pub struct SubscriptionGuard(std::sync::Arc<Metrics>);

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.0.subscriptions.fetch_sub(1, Ordering::Relaxed);
    }
}

//! What `/metrics` says, in Prometheus's text format: the mailboxes this replica serves by
//! state, the events it received, its fetches and deliveries by outcome and how long a
//! delivery took, how many announced mails wait for Creatio, the leases it took over, how its
//! coordinator's passes go (their duration, the leases held, trusted and leaving, the claims
//! asked), the store's errors, the streams service accounts' mailboxes share, the mails sent, and the mails history loads
//! listed. One [`Metrics`] per
//! process, handed to whoever counts.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The process's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Mailboxes whose lease this replica holds, by worker state (set at each scrape).
    pub mailboxes: IntGaugeVec,
    /// New-mail notifications received on streams.
    pub events: IntCounter,
    /// Items fetched from Exchange, by outcome: `mail`, `gone`, `dead`.
    pub fetches: IntCounterVec,
    /// Items handed to Creatio, by outcome: `delivered`, `dead_letter`.
    pub deliveries: IntCounterVec,
    /// Seconds from the moment a delivery started to Creatio's acceptance, retries included.
    pub delivery_seconds: HistogramVec,
    /// New items announced or found and not yet delivered, dead-lettered or skipped: this
    /// replica's outbox. Exchange keeps them, and the sync cursor does not pass them, until
    /// their outcome is recorded.
    pub pending: IntGauge,
    /// Leases this replica took (a start, or a takeover from another replica).
    pub leases_taken: IntCounter,
    /// Seconds each coordinator pass took: past a third of the lease, leases are trusted for
    /// less than a pass.
    pub pass_seconds: prometheus::Histogram,
    /// Leases after the last pass: `held` (this replica's share), `trusted` (of those, safe to
    /// act on now), `idle` (trusted, without a worker: each gets one), `leaving` (no longer
    /// its share, kept while the worker stops).
    pub leases: IntGaugeVec,
    /// Leases the last pass asked the store for.
    pub pass_claims: IntGauge,
    /// Milliseconds the last coordinator pass took.
    pub last_pass_ms: IntGauge,
    /// Store calls that failed, by operation.
    pub store_errors: IntCounterVec,
    /// Streaming connections a service account's mailboxes share, open now.
    pub shared_streams: IntGauge,
    /// Mails Creatio asked to send, by outcome: `sent`, `already_sent` (a retry of one sent),
    /// `busy` (being sent by another call), `refused` (by the mail server), `failed`.
    pub sends: IntCounterVec,
    /// Mails history loads listed (posted, or found delivered already).
    pub history_mails: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("exchange_listener".into()), None).expect("a valid prefix");
        let metrics = Metrics {
            mailboxes: IntGaugeVec::new(
                Opts::new("mailboxes", "Mailboxes this replica serves, by state"),
                &["state"],
            )
            .expect("valid metric"),
            events: IntCounter::new("events_total", "New-mail notifications received")
                .expect("valid metric"),
            fetches: IntCounterVec::new(
                Opts::new("fetches_total", "Items fetched from Exchange, by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            deliveries: IntCounterVec::new(
                Opts::new("deliveries_total", "Items handed to Creatio, by outcome"),
                &["outcome", "operation"],
            )
            .expect("valid metric"),
            delivery_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "delivery_seconds",
                    "Time from the start of a delivery to Creatio's acceptance",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
                ]),
                &["operation"],
            )
            .expect("valid metric"),
            pending: IntGauge::new(
                "deliveries_pending",
                "New items waiting to be delivered to Creatio (the outbox's depth)",
            )
            .expect("valid metric"),
            leases_taken: IntCounter::new("leases_taken_total", "Mailbox leases this replica took")
                .expect("valid metric"),
            pass_seconds: prometheus::Histogram::with_opts(
                HistogramOpts::new("pass_seconds", "Time each coordinator pass took").buckets(
                    vec![
                        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                    ],
                ),
            )
            .expect("valid metric"),
            leases: IntGaugeVec::new(
                Opts::new(
                    "leases",
                    "Leases after the last coordinator pass: held, trusted, idle, leaving",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            pass_claims: IntGauge::new(
                "pass_claims",
                "Leases the last coordinator pass asked the store for",
            )
            .expect("valid metric"),
            last_pass_ms: IntGauge::new(
                "last_pass_milliseconds",
                "Milliseconds the last coordinator pass took",
            )
            .expect("valid metric"),
            store_errors: IntCounterVec::new(
                Opts::new(
                    "store_errors_total",
                    "Store calls that failed, by operation",
                ),
                &["operation"],
            )
            .expect("valid metric"),
            shared_streams: IntGauge::new(
                "shared_streams",
                "Streaming connections service accounts' mailboxes share, open now",
            )
            .expect("valid metric"),
            sends: IntCounterVec::new(
                Opts::new("sends_total", "Mails Creatio asked to send, by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            history_mails: IntCounter::new(
                "history_mails_total",
                "Mails history loads listed (posted, or found delivered already)",
            )
            .expect("valid metric"),
            registry,
        };
        for collector in [
            Box::new(metrics.mailboxes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.events.clone()),
            Box::new(metrics.fetches.clone()),
            Box::new(metrics.deliveries.clone()),
            Box::new(metrics.delivery_seconds.clone()),
            Box::new(metrics.pending.clone()),
            Box::new(metrics.leases_taken.clone()),
            Box::new(metrics.pass_seconds.clone()),
            Box::new(metrics.leases.clone()),
            Box::new(metrics.pass_claims.clone()),
            Box::new(metrics.last_pass_ms.clone()),
            Box::new(metrics.store_errors.clone()),
            Box::new(metrics.shared_streams.clone()),
            Box::new(metrics.sends.clone()),
            Box::new(metrics.history_mails.clone()),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("each metric registered once");
        }
        metrics
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        m.events.inc();
        m.deliveries
            .with_label_values(&["delivered", "ProcessFullEmail"])
            .inc();
        m.delivery_seconds
            .with_label_values(&["ProcessFullEmail"])
            .observe(0.002);
        m.mailboxes.with_label_values(&["Streaming"]).set(3);
        m.pending.add(2);
        let text = m.render();
        assert!(text.contains("exchange_listener_events_total 1"), "{text}");
        assert!(text.contains(
            r#"exchange_listener_deliveries_total{operation="ProcessFullEmail",outcome="delivered"} 1"#
        ));
        assert!(text.contains(r#"exchange_listener_mailboxes{state="Streaming"} 3"#));
        assert!(text.contains("exchange_listener_delivery_seconds_bucket"));
        assert!(
            text.contains("exchange_listener_deliveries_pending 2"),
            "{text}"
        );
    }
}

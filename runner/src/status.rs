//! The HTTP status endpoint: `/health` (200 or 503), `/status` (the counters and the rules in
//! service, as JSON) and `/metrics` (the same counters in Prometheus text format).

use crate::events::{Events, Stats};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// Serves until `shutdown` turns true. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    events: Arc<Events>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(events);
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, "Status endpoint stopped.");
        }
    });
    tracing::info!(addr = %bound, "Status endpoint listening.");
    Ok((bound, task))
}

/// Problems that make the runner degraded (it keeps running, possibly on stale data).
pub fn degraded_reasons(s: &Stats) -> Vec<&'static str> {
    let mut r = Vec::new();
    if s.cache_stale {
        r.push("subscriber_cache_stale");
    }
    if s.kafka_failing {
        r.push("kafka_sink_retrying");
    }
    if s.kafka_unreachable {
        r.push("kafka_unreachable");
    }
    if s.postgres_failing {
        r.push("postgres_sink_retrying");
    }
    r
}

async fn health(State(events): State<Arc<Events>>) -> impl IntoResponse {
    let stats = events.stats();
    let reasons = degraded_reasons(&stats);
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({ "healthy": reasons.is_empty(), "degraded": reasons })),
    )
}

async fn status(State(events): State<Arc<Events>>) -> impl IntoResponse {
    let stats = events.stats();
    let degraded = degraded_reasons(&stats);
    Json(serde_json::json!({
        "healthy": degraded.is_empty(),
        "degraded": degraded,
        "stats": stats,
        "latency": events.latency(),
        "stages": events.stages(),
    }))
}

async fn metrics(State(events): State<Arc<Events>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&events.stats()),
    )
}

/// Prometheus text exposition of the counters.
pub fn render_metrics(s: &Stats) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(
            out,
            "# HELP runner_{name} {help}\n# TYPE runner_{name} counter"
        );
        for (labels, v) in samples {
            let _ = writeln!(out, "runner_{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    let labelled =
        |label: &str, m: &mut dyn Iterator<Item = (String, u64)>| -> Vec<(String, u64)> {
            m.map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), v))
                .collect()
        };
    counter(
        "messages_received_total",
        "Input messages taken from the campaign topic.",
        &one(s.received),
    );
    counter(
        "campaigns_delivered_total",
        "Active campaigns whose drafts are in both sinks.",
        &one(s.campaigns_delivered),
    );
    counter(
        "drafts_delivered_total",
        "Drafts written to both sinks.",
        &one(s.drafts_delivered),
    );
    counter(
        "offsets_stored_total",
        "Input messages whose offsets were stored after both sinks.",
        &one(s.offsets_stored),
    );
    counter(
        "sink_retries_total",
        "Sink writes retried after a failure.",
        &one(s.sink_retries),
    );
    counter(
        "partitions_fenced_total",
        "Partitions given up because another runner claimed them.",
        &one(s.partitions_fenced),
    );
    counter(
        "subscriber_resyncs_total",
        "Full loads of the subscriber table.",
        &one(s.cache_resyncs),
    );
    counter(
        "skipped_total",
        "Valid campaigns that produced nothing, by reason.",
        &labelled(
            "reason",
            &mut s.skipped.iter().map(|(k, v)| (k.to_string(), *v)),
        ),
    );
    counter(
        "dead_lettered_total",
        "Messages sent to the dead-letter topic, by reason.",
        &labelled(
            "reason",
            &mut s.dead_lettered.iter().map(|(k, v)| (k.clone(), *v)),
        ),
    );
    counter(
        "rules_swaps_total",
        "Rules components swapped in while running.",
        &one(s.rules.swaps),
    );
    counter(
        "rules_refused_total",
        "Rules components refused at reload, by reason.",
        &labelled(
            "reason",
            &mut s.rules.refused.iter().map(|(k, v)| (k.to_string(), *v)),
        ),
    );
    let mut gauge = |name: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(
            out,
            "# HELP runner_{name} {help}\n# TYPE runner_{name} gauge"
        );
        for (labels, v) in samples {
            let _ = writeln!(out, "runner_{name}{labels} {v}");
        }
    };
    let flag = |b: bool| vec![(String::new(), u64::from(b))];
    gauge(
        "rules_info",
        "The rules in service.",
        &[(
            format!(
                "{{version=\"{}\",sha256=\"{}\"}}",
                s.rules.version, s.rules.sha256
            ),
            1,
        )],
    );
    gauge(
        "subscriber_cache_stale",
        "1 while the subscriber snapshot is known to be stale.",
        &flag(s.cache_stale),
    );
    gauge(
        "kafka_unreachable",
        "1 while the broker does not answer metadata probes.",
        &flag(s.kafka_unreachable),
    );
    gauge(
        "sink_failing",
        "1 while writes to the sink are failing and being retried.",
        &[
            ("{sink=\"kafka\"}".to_string(), u64::from(s.kafka_failing)),
            (
                "{sink=\"postgres\"}".to_string(),
                u64::from(s.postgres_failing),
            ),
        ],
    );
    out
}

//! The HTTP status endpoint:
//! - `/health/live`: 200 while every pipeline starts or its delivery loop runs (else 503):
//!   restart me if not;
//! - `/health/ready`: 200 once every pipeline has started, holds what the group gave it (each
//!   partition taken over, or none to give), reaches the brokers and its input topic, and its
//!   own conditions allow work (a fresh subscriber cache), else 503 with the reasons: send me
//!   work, or wait;
//! - `/health`: 200, or 503 with the reasons when a pipeline is starting or degraded (a sink
//!   retrying, the broker unreachable, a stale cache);
//! - with either of the last two, while a pipeline starts, `startup` says what it waits for
//!   (`starting` or, past the start-up deadline, `startup_failed`; the causes, by code and in
//!   sentences naming the brokers, the topic or the host);
//!
//! The endpoint answers from the process's start, before the pipelines have started.
//! - `/status`: every pipeline's counters, rules in service, latencies, as JSON;
//! - `/metrics`: the Prometheus text exposition of the registry.

use crate::events::Events;
use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// What the endpoint reports on.
#[derive(Debug, Clone)]
struct Reported {
    pipelines: Vec<Arc<Events>>,
    metrics: Metrics,
}

/// Serves until `shutdown` turns true. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    pipelines: Vec<Arc<Events>>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(Reported { pipelines, metrics });
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

/// Why the runner is degraded: each pipeline's reasons, as `reason` (and per pipeline).
fn degraded(pipelines: &[Arc<Events>]) -> (Vec<&'static str>, serde_json::Value) {
    let mut all = Vec::new();
    let mut per = serde_json::Map::new();
    for e in pipelines {
        let reasons = e.stats().degraded();
        for r in &reasons {
            if !all.contains(r) {
                all.push(*r);
            }
        }
        per.insert(e.pipeline().to_string(), serde_json::json!(reasons));
    }
    (all, serde_json::Value::Object(per))
}

/// What the pipelines still starting wait for, by pipeline.
fn startup(pipelines: &[Arc<Events>]) -> serde_json::Value {
    let per: serde_json::Map<String, serde_json::Value> = pipelines
        .iter()
        .filter_map(|e| {
            let s = e.stats().startup?;
            Some((e.pipeline().to_string(), serde_json::json!(s)))
        })
        .collect();
    serde_json::Value::Object(per)
}

/// 200 with `body` when `reasons` is empty, else 503.
fn answer(
    reasons: Vec<(String, Vec<&'static str>)>,
    key: &str,
    startup: serde_json::Value,
) -> (StatusCode, Json<serde_json::Value>) {
    let ok = reasons.iter().all(|(_, r)| r.is_empty());
    let per: serde_json::Map<String, serde_json::Value> = reasons
        .into_iter()
        .map(|(p, r)| (p, serde_json::json!(r)))
        .collect();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({ key: ok, "pipelines": per });
    if startup.as_object().is_some_and(|s| !s.is_empty()) {
        body["startup"] = startup;
    }
    (code, Json(body))
}

async fn live(State(r): State<Reported>) -> impl IntoResponse {
    answer(
        r.pipelines
            .iter()
            .map(|e| {
                let s = e.stats();
                let reasons = if s.running || s.startup.is_some() {
                    vec![]
                } else {
                    vec!["not_running"]
                };
                (e.pipeline().to_string(), reasons)
            })
            .collect(),
        "live",
        serde_json::Value::Null,
    )
}

async fn ready(State(r): State<Reported>) -> impl IntoResponse {
    answer(
        r.pipelines
            .iter()
            .map(|e| (e.pipeline().to_string(), e.stats().not_ready()))
            .collect(),
        "ready",
        startup(&r.pipelines),
    )
}

async fn health(State(r): State<Reported>) -> impl IntoResponse {
    let (reasons, per) = degraded(&r.pipelines);
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({
        "healthy": reasons.is_empty(),
        "degraded": reasons,
        "pipelines": per,
    });
    let startup = startup(&r.pipelines);
    if startup.as_object().is_some_and(|s| !s.is_empty()) {
        body["startup"] = startup;
    }
    (code, Json(body))
}

async fn status(State(r): State<Reported>) -> impl IntoResponse {
    let (reasons, _) = degraded(&r.pipelines);
    let pipelines: serde_json::Map<String, serde_json::Value> = r
        .pipelines
        .iter()
        .map(|e| {
            let stats = e.stats();
            (
                e.pipeline().to_string(),
                serde_json::json!({
                    "degraded": stats.degraded(),
                    "stats": stats,
                    "latency": e.latency(),
                    "stages": e.stages(),
                }),
            )
        })
        .collect();
    Json(serde_json::json!({
        "healthy": reasons.is_empty(),
        "degraded": reasons,
        "pipelines": pipelines,
    }))
}

async fn metrics_text(State(r): State<Reported>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        r.metrics.render(),
    )
}

//! Kafka output: drafts to the output topic and dead letters to their topic, through one
//! idempotent producer. Records borrow from the batch's in-memory results (computed once).

use super::{pause, Abandoned, Backoff};
use crate::events::Events;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use std::time::Duration;

/// One record to produce, borrowing its bytes.
#[derive(Debug, Clone)]
pub struct OutRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: OwnedHeaders,
}

/// Builds headers from (name, value) pairs.
pub fn headers<'v>(pairs: impl IntoIterator<Item = (&'v str, &'v [u8])>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").finish_non_exhaustive()
    }
}

impl KafkaSink {
    pub fn new(config: &ClientConfig) -> Result<KafkaSink, KafkaError> {
        Ok(KafkaSink {
            producer: config.create()?,
        })
    }

    /// Produces every record and waits for every acknowledgement. A record whose delivery
    /// fails is produced again after a backoff (only that record), until all are acknowledged
    /// or `stop` fires.
    pub async fn send_all(
        &self,
        records: &[OutRecord<'_>],
        events: &Events,
        max_backoff: Duration,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Abandoned> {
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut backoff = Backoff::new(max_backoff);
        while !pending.is_empty() {
            let mut inflight = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            let mut first_error: Option<KafkaError> = None;
            for &i in &pending {
                let r = &records[i];
                loop {
                    let mut rec =
                        FutureRecord::<[u8], [u8]>::to(r.topic).headers(r.headers.clone());
                    if let Some(k) = r.key {
                        rec = rec.key(k);
                    }
                    if let Some(p) = r.payload {
                        rec = rec.payload(p);
                    }
                    match self.producer.send_result(rec) {
                        Ok(f) => {
                            inflight.push((i, f));
                            break;
                        }
                        // The local queue is full: let deliveries drain, then try again.
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err((e, _)) => {
                            first_error.get_or_insert(e);
                            failed.push(i);
                            break;
                        }
                    }
                }
            }
            for (i, f) in inflight {
                match f.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        first_error.get_or_insert(e);
                        failed.push(i);
                    }
                    Err(_canceled) => {
                        first_error.get_or_insert(KafkaError::Canceled);
                        failed.push(i);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            let wait = backoff.step();
            let e = first_error.expect("a failure has an error");
            events.sink_retry(
                "kafka",
                &format_args!("{} of {} records failed: {e}", failed.len(), pending.len()),
                backoff.attempt,
                wait,
            );
            if !pause(wait, stop).await {
                return Err(Abandoned);
            }
            pending = failed;
        }
        Ok(())
    }

    /// Waits for everything queued to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "Producer flush did not finish.");
        }
    }
}

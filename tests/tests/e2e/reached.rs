//! Each (campaign, client) draft exactly once in `subscribers_feedback`, kept by what each
//! campaign has reached (`campaign_runner_delivered`), not by an index on SPEC.md's table:
//! units committed straight through the campaign pipeline's PostgreSQL side, as a runner
//! commits them — the same campaign twice in one unit, a unit committed again, first
//! deliveries of one campaign on two partitions at the same time, the drafts written before
//! this table existed — and a unit whose COMMIT committed but whose answer was lost.

use e2e_tests::*;
use runner::delivery::{Evaluated, Fence, Kept, OutboxEntry, Outcome, PgSide, Records, Target};
use runner::events::{Events, SourcePos};
use runner::pipelines::campaigns::contract::{Campaign, TemplateDrafts};
use runner::pipelines::campaigns::drafts::{ClientIds, Drafts};
use runner::pipelines::campaigns::schedule::{Cause, RegistryOp};
use runner::pipelines::campaigns::{CampaignDelivery, Campaigns};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::watch;

const NOW: i64 = 1_700_000_000;
const TOPIC: &str = "campaigns";
const RESTAURANT: &str = "123e4567-e89b-12d3-a456-426614174000";

type Unit = Vec<Evaluated<CampaignDelivery, RegistryOp>>;

/// A campaign's drafts for `clients`, as the rules hand them over (one slot: the client id).
fn drafts(campaign_id: &str, clients: &[&str]) -> anyhow::Result<Drafts> {
    let owned: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
    let fill_ends = clients
        .iter()
        .scan(0, |end, c| {
            *end += c.len() as u32;
            Some(*end)
        })
        .collect();
    Ok(Drafts::new(
        ClientIds::packed(&owned),
        TemplateDrafts {
            campaign: Campaign {
                restaurant_id: RESTAURANT.into(),
                adv_campaign_id: campaign_id.into(),
                adv_campaign_content: "content".into(),
                adv_campaign_owner: "o".into(),
                adv_campaign_owner_contact: "c".into(),
                adv_campaign_datetime_start: NOW - 10,
                adv_campaign_datetime_end: NOW + 10,
                datetime_created: NOW - 110,
            },
            trigger_datetime_created: NOW,
            shared: b"draft for ".to_vec(),
            shared_ends: vec![10, 10],
            fills: clients.concat().into_bytes(),
            fill_ends,
        },
        1 << 20,
    )?)
}

/// A unit of `partition`: one delivered message per `(campaign, clients)`, at offsets from
/// `first`, and their outbox entries.
fn unit(
    partition: i32,
    first: i64,
    messages: &[(&str, &[&str])],
) -> anyhow::Result<(Unit, Vec<OutboxEntry>)> {
    let mut unit = Vec::new();
    let mut entries = Vec::new();
    for (i, (campaign_id, clients)) in messages.iter().enumerate() {
        let offset = first + i as i64;
        let d = drafts(campaign_id, clients)?;
        entries.push(OutboxEntry {
            source_offset: offset,
            target: Target::Output,
            records: Records::Template(d.records().clone()),
            headers: vec![("rules-version".into(), b"campaign-rules 4.0.0".to_vec())],
        });
        unit.push(Evaluated {
            msg: rdkafka::message::OwnedMessage::new(
                None,
                None,
                TOPIC.into(),
                rdkafka::Timestamp::NotAvailable,
                partition,
                offset,
                None,
            ),
            pos: SourcePos {
                topic: TOPIC.into(),
                partition,
                offset,
            },
            outcome: Outcome::Deliver(CampaignDelivery {
                drafts: d,
                trigger: NOW as i32,
                snapshot: 1,
                cause: Cause::Published,
                registry: None,
            }),
        });
    }
    Ok((unit, entries))
}

/// A runner's PostgreSQL side that owns `partition`.
async fn owner(db: &TestDb, partition: i32) -> anyhow::Result<(PgSide<Campaigns>, Fence)> {
    let (_tx, mut stop) = watch::channel(false);
    let mut side = campaigns_pg(db);
    let fence = side
        .claim(
            TOPIC,
            partition,
            &format!("runner-{partition}"),
            &Events::default(),
            Duration::from_secs(1),
            &mut stop,
        )
        .await?;
    Ok((side, fence))
}

async fn commit(
    side: &mut PgSide<Campaigns>,
    fence: &Fence,
    (unit, entries): &(Unit, Vec<OutboxEntry>),
) -> anyhow::Result<Vec<Kept>> {
    let (_tx, mut stop) = watch::channel(false);
    Ok(side
        .commit(
            fence,
            unit,
            entries,
            None,
            &Events::default(),
            Duration::from_secs(1),
            &mut stop,
        )
        .await?)
}

/// The clients a unit's commit published, per campaign.
fn published((unit, _): &(Unit, Vec<OutboxEntry>), kept: &[Kept]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in kept {
        let Outcome::Deliver(d) = &unit[k.entry].outcome else {
            panic!("entry {} is not a delivery", k.entry);
        };
        let clients: Vec<&str> = d.drafts.iter().map(|draft| draft.client_id).collect();
        let chosen: Vec<String> = match &k.only {
            None => clients.iter().map(|c| c.to_string()).collect(),
            Some(only) => only.iter().map(|&i| clients[i].to_string()).collect(),
        };
        out.entry(d.drafts.campaign.adv_campaign_id.clone())
            .or_default()
            .extend(chosen);
    }
    out
}

/// Every (campaign, client) row of the feedback table, with its number of copies.
async fn rows(db: &TestDb) -> anyhow::Result<BTreeMap<(String, String), i64>> {
    Ok(db
        .client()
        .await?
        .query(
            "SELECT adv_campaign_id, client_id, count(*) FROM subscribers_feedback GROUP BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// What `campaign_runner_delivered` says each campaign has reached.
async fn reached(db: &TestDb) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    Ok(db
        .client()
        .await?
        .query(
            "SELECT adv_campaign_id, clients FROM campaign_runner_delivered",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get::<_, Vec<String>>(1).into_iter().collect()))
        .collect())
}

fn pairs(campaign: &str, clients: &[&str]) -> BTreeMap<(String, String), i64> {
    clients
        .iter()
        .map(|c| ((campaign.to_string(), c.to_string()), 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_campaign_twice_in_a_unit_and_a_unit_committed_again_write_each_draft_once(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?.with_schema().await?;
    let (mut side, fence) = owner(&db, 0).await?;
    let x = "00000000-0000-4000-8000-0000000000a1";
    let first = unit(0, 0, &[(x, &["a", "b"]), (x, &["b", "c"])])?;
    let kept = commit(&mut side, &fence, &first).await?;
    assert_eq!(
        kept,
        vec![
            Kept {
                entry: 0,
                only: None
            },
            Kept {
                entry: 1,
                only: Some(vec![1])
            }
        ],
        "the second message of the campaign publishes only the client the first did not have"
    );
    assert_eq!(rows(&db).await?, pairs(x, &["a", "b", "c"]));
    // The same messages committed again (a replay): nothing is new.
    let kept = commit(&mut side, &fence, &first).await?;
    assert_eq!(
        kept,
        vec![],
        "nothing of a replayed unit is published again"
    );
    assert_eq!(rows(&db).await?, pairs(x, &["a", "b", "c"]));
    // Published again later, with one more subscriber: only the newcomer.
    let again = unit(0, 2, &[(x, &["c", "a", "d", "b"])])?;
    let kept = commit(&mut side, &fence, &again).await?;
    assert_eq!(
        published(&again, &kept),
        BTreeMap::from([(x.to_string(), vec!["d".to_string()])])
    );
    assert_eq!(rows(&db).await?, pairs(x, &["a", "b", "c", "d"]));
    assert_eq!(
        reached(&db).await?,
        BTreeMap::from([(x.to_string(), ["a", "b", "c", "d"].map(String::from).into())])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_deliveries_of_the_same_campaigns_on_two_partitions_at_once_write_each_draft_once(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?.with_schema().await?;
    let (mut side0, fence0) = owner(&db, 0).await?;
    let (mut side1, fence1) = owner(&db, 1).await?;
    let mut expected = BTreeMap::new();
    for round in 0..20i64 {
        let x = format!("00000000-0000-4000-8000-{:012}", 2 * round);
        let y = format!("00000000-0000-4000-8000-{:012}", 2 * round + 1);
        // The two units name the campaigns in opposite orders, with overlapping clients.
        let u0 = unit(0, 2 * round, &[(&x, &["a", "b", "c"]), (&y, &["p", "q"])])?;
        let u1 = unit(1, 2 * round, &[(&y, &["q", "r"]), (&x, &["c", "d"])])?;
        let (k0, k1) = tokio::join!(
            commit(&mut side0, &fence0, &u0),
            commit(&mut side1, &fence1, &u1)
        );
        let (p0, p1) = (published(&u0, &k0?), published(&u1, &k1?));
        for (campaign, all) in [(&x, &["a", "b", "c", "d"][..]), (&y, &["p", "q", "r"][..])] {
            let mut got: Vec<String> = p0.get(campaign).into_iter().flatten().cloned().collect();
            got.extend(p1.get(campaign).into_iter().flatten().cloned());
            got.sort();
            let want: Vec<String> = all.iter().map(|c| c.to_string()).collect();
            assert_eq!(
                got, want,
                "round {round}, campaign {campaign}: each client published by exactly one unit"
            );
            for c in &want {
                expected.insert((campaign.clone(), c.clone()), 1);
            }
        }
    }
    assert_eq!(rows(&db).await?, expected, "each draft once in the table");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_written_before_the_table_existed_count_as_delivered() -> anyhow::Result<()> {
    // A database as an earlier version of the runner left it: SPEC.md's tables, drafts of two
    // campaigns, and the unique index that version added to the feedback table.
    let db = TestDb::new().await?;
    let c = db.client().await?;
    c.batch_execute(runner::pipelines::campaigns::schema::SCHEMA_SQL)
        .await?;
    let (x, y) = (
        "00000000-0000-4000-8000-0000000000b1",
        "00000000-0000-4000-8000-0000000000b2",
    );
    for (campaign, client) in [(x, "a"), (x, "b"), (y, "a")] {
        c.execute(
            "INSERT INTO subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, \
             adv_campaign_owner, adv_campaign_owner_contact, adv_campaign_datetime_start, \
             adv_campaign_datetime_end, datetime_created, client_id, trigger_datetime_created) \
             VALUES ($1, $2, 'content', 'o', 'c', 1, 2, 3, $3, 4)",
            &[&RESTAURANT, &campaign, &client],
        )
        .await?;
    }
    c.batch_execute(
        "CREATE UNIQUE INDEX subscribers_feedback_campaign_client_key \
         ON subscribers_feedback (adv_campaign_id, client_id)",
    )
    .await?;

    let db = db.with_schema().await?;
    assert_eq!(
        db.count("SELECT count(*) FROM pg_indexes WHERE tablename = 'subscribers_feedback'")
            .await?,
        1,
        "only SPEC.md's primary key is left on the feedback table"
    );
    assert_eq!(
        reached(&db).await?,
        BTreeMap::from([
            (x.to_string(), ["a", "b"].map(String::from).into()),
            (y.to_string(), ["a"].map(String::from).into()),
        ])
    );
    // Starting again changes nothing.
    let db = db.with_schema().await?;
    assert_eq!(reached(&db).await?.len(), 2);

    let (mut side, fence) = owner(&db, 0).await?;
    let republished = unit(0, 0, &[(x, &["a", "b", "c"]), (y, &["a"])])?;
    let kept = commit(&mut side, &fence, &republished).await?;
    assert_eq!(
        published(&republished, &kept),
        BTreeMap::from([(x.to_string(), vec!["c".to_string()])])
    );
    let mut want = pairs(x, &["a", "b", "c"]);
    want.extend(pairs(y, &["a"]));
    assert_eq!(rows(&db).await?, want);
    Ok(())
}

/// A TCP proxy to PostgreSQL that, `times` times, closes the connection as the server answers
/// a COMMIT: the transaction has committed, and the client never hears so.
struct CommitAnswerLost {
    addr: std::net::SocketAddr,
    lost: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CommitAnswerLost {
    /// The server's CommandComplete message for a COMMIT: tag, length, "COMMIT\0".
    const ANSWER: &'static [u8] = b"C\0\0\0\x0bCOMMIT\0";

    async fn start(upstream: String, times: usize) -> anyhow::Result<CommitAnswerLost> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let lost = Arc::new(AtomicUsize::new(0));
        let left = Arc::new(AtomicUsize::new(times));
        let counted = lost.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (left, counted) = (left.clone(), counted.clone());
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let up = tokio::spawn(async move {
                        tokio::io::copy(&mut from_client, &mut to_server).await
                    });
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match from_server.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let at = buf[..n]
                            .windows(Self::ANSWER.len())
                            .position(|w| w == Self::ANSWER);
                        if let Some(at) = at {
                            let armed = left
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                                    l.checked_sub(1)
                                })
                                .is_ok();
                            if armed {
                                let _ = to_client.write_all(&buf[..at]).await;
                                counted.fetch_add(1, Ordering::SeqCst);
                                up.abort();
                                return;
                            }
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Ok(CommitAnswerLost { addr, lost })
    }

    fn lost(&self) -> usize {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_whose_commit_answer_is_lost_is_published_whole() -> anyhow::Result<()> {
    let db = TestDb::new().await?.with_schema().await?;
    let cfg: tokio_postgres::Config = db.url.parse()?;
    let (host, port) = match (cfg.get_hosts().first(), cfg.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => (h.clone(), *p),
        _ => anyhow::bail!("the test database is not reached over TCP: {}", db.url),
    };
    let proxy = CommitAnswerLost::start(format!("{host}:{port}"), 1).await?;
    let through_proxy = db
        .url
        .replace(
            &format!("host={host}"),
            &format!("host={}", proxy.addr.ip()),
        )
        .replace(
            &format!("port={port}"),
            &format!("port={}", proxy.addr.port()),
        );
    anyhow::ensure!(through_proxy != db.url, "{} names no host and port", db.url);
    let (_tx, mut stop) = watch::channel(false);
    let mut side = campaigns_pg_at(&through_proxy);
    let fence = side
        .claim(
            TOPIC,
            0,
            "runner-0",
            &Events::default(),
            Duration::from_secs(1),
            &mut stop,
        )
        .await?;
    let x = "00000000-0000-4000-8000-0000000000c1";
    let u = unit(0, 0, &[(x, &["a", "b", "c"])])?;
    let kept = commit(&mut side, &fence, &u).await?;
    assert_eq!(proxy.lost(), 1, "the COMMIT's answer was lost once");
    assert_eq!(
        kept,
        vec![Kept {
            entry: 0,
            only: None
        }],
        "the unit committed: all its drafts go to Kafka, none is taken for one delivered before"
    );
    assert_eq!(rows(&db).await?, pairs(x, &["a", "b", "c"]));
    assert_eq!(
        db.count("SELECT count(*) FROM campaign_runner_outbox WHERE source_offset = 0")
            .await?,
        1,
        "its outbox entry once"
    );
    Ok(())
}

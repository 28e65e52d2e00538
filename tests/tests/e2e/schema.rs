//! The schema step creates SPEC.md's tables when absent, leaves existing ones as they are, and
//! refuses (clearly) a table the runner cannot write.

use e2e_tests::*;
use runner::app::RunOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_the_spec_tables_when_absent() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    runner::pipelines::campaigns::ensure_schema(&db.client().await?).await?;
    let c = db.client().await?;
    let cols: Vec<(String, String, String)> = c
        .query(
            "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let feedback: Vec<_> = cols
        .iter()
        .filter(|c| c.0 == "subscribers_feedback")
        .map(|c| (c.1.as_str(), c.2.as_str()))
        .collect();
    assert_eq!(
        feedback,
        [
            ("id", "integer"),
            ("restaurant_id", "text"),
            ("adv_campaign_id", "text"),
            ("adv_campaign_content", "text"),
            ("adv_campaign_owner", "text"),
            ("adv_campaign_owner_contact", "text"),
            ("adv_campaign_datetime_start", "bigint"),
            ("adv_campaign_datetime_end", "bigint"),
            ("datetime_created", "bigint"),
            ("client_id", "text"),
            ("trigger_datetime_created", "integer"),
            ("feedback", "character varying"),
        ]
    );
    let subs: Vec<_> = cols
        .iter()
        .filter(|c| c.0 == "subscribers_restaurants")
        .map(|c| (c.1.as_str(), c.2.as_str()))
        .collect();
    assert_eq!(
        subs,
        [
            ("id", "integer"),
            ("client_id", "character varying"),
            ("restaurant_id", "character varying")
        ]
    );
    // Idempotent.
    runner::pipelines::campaigns::ensure_schema(&c).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_tables_are_never_altered() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let c = db.client().await?;
    c.batch_execute(
        "CREATE TABLE public.subscribers_restaurants (id serial4 PRIMARY KEY, client_id varchar NOT NULL, \
         restaurant_id varchar NOT NULL, added_by text)",
    )
    .await?;
    runner::pipelines::campaigns::ensure_schema(&c).await?;
    let n = db
        .count("SELECT count(*) FROM information_schema.columns WHERE table_name = 'subscribers_restaurants' AND column_name = 'added_by'")
        .await?;
    assert_eq!(n, 1, "the extra column is still there");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_runner_cannot_write_is_refused_clearly() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?;
    db.client()
        .await?
        .batch_execute("CREATE TABLE public.subscribers_feedback (id serial4 PRIMARY KEY, restaurant_id text NOT NULL)")
        .await?;
    let err = start(config(&kafka, &db, ""), RunOptions::default())
        .await
        .expect_err("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("subscribers_feedback") && msg.contains("adv_campaign_id"),
        "{msg}"
    );
    Ok(())
}

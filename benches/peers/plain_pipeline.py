"""The campaign fan-out as a plain at-least-once pipeline: the benchmark peer of `bench fanout`.

Reads campaigns, makes one draft per subscriber of an active campaign (the runner's draft JSON,
byte for byte), produces the drafts keyed by client id and COPYs them into
subscribers_feedback, then commits the input offsets. No deduplication: a crash between the
sinks and the offset commit delivers a batch again.
"""
import argparse, json, sys, time
from collections import defaultdict
from confluent_kafka import Consumer, Producer
import psycopg

STR = ("restaurant_id", "adv_campaign_id", "adv_campaign_content", "adv_campaign_owner", "adv_campaign_owner_contact")
INT = ("adv_campaign_datetime_start", "adv_campaign_datetime_end", "datetime_created")
COPY = ("COPY subscribers_feedback (restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner, "
        "adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end, datetime_created, "
        "client_id, trigger_datetime_created) FROM STDIN")

def valid(c):
    return (isinstance(c, dict) and all(isinstance(c.get(f), str) for f in STR)
            and all(type(c.get(f)) is int for f in INT)
            and c["adv_campaign_datetime_start"] < c["adv_campaign_datetime_end"])

def main():
    p = argparse.ArgumentParser(description=__doc__)
    for a in ("brokers", "topic", "output_topic", "group", "postgres_url"):
        p.add_argument(a)
    p.add_argument("--now", type=int, help="unix seconds (default: the wall clock)")
    p.add_argument("--drafts", type=int, default=0, help="stop after writing this many rows")
    p.add_argument("--batch", type=int, default=50, help="campaigns per transaction")
    p.add_argument("--idle", type=float, default=5.0, help="stop after this many idle seconds")
    args = p.parse_args()
    conn = psycopg.connect(args.postgres_url)
    subscribers = defaultdict(set)
    for client, restaurant in conn.execute("SELECT client_id, restaurant_id FROM subscribers_restaurants"):
        subscribers[restaurant].add(client)
    conn.commit()
    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    failed = []
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 20, "batch.size": 1_000_000,
                         "compression.type": "lz4", "queue.buffering.max.messages": 2_000_000,
                         "delivery.report.only.error": True, "on_delivery": lambda err, _: failed.append(err)})
    consumer.subscribe([args.topic])
    written, idle_since, started = 0, time.monotonic(), None
    while not args.drafts or written < args.drafts:
        msgs = [m for m in consumer.consume(num_messages=args.batch, timeout=0.5) if not m.error()]
        if not msgs:
            if time.monotonic() - idle_since > args.idle:
                break
            continue
        idle_since, started = time.monotonic(), started or time.monotonic()
        now = args.now if args.now is not None else int(time.time())
        with conn.cursor() as cur, cur.copy(COPY) as copy:
            for m in msgs:
                try:
                    c = json.loads(m.value())
                except (TypeError, ValueError):
                    continue
                if not valid(c) or not c["adv_campaign_datetime_start"] < now < c["adv_campaign_datetime_end"]:
                    continue
                fields = [c[f] for f in STR + INT]
                # The draft: the campaign's fields, client_id before datetime_created, then the trigger time.
                head = json.dumps({f: c[f] for f in STR + INT[:2]}, ensure_ascii=False, separators=(",", ":"))[:-1]
                head, tail = head + ',"client_id":', ',"datetime_created":%d,"trigger_datetime_created":%d}' % (c["datetime_created"], now)
                for client in subscribers.get(c["restaurant_id"], ()):
                    producer.produce(args.output_topic, head + json.dumps(client, ensure_ascii=False) + tail, client)
                    copy.write_row(fields + [client, now])
                    written += 1
                producer.poll(0)
        if producer.flush(60) or failed:
            raise RuntimeError(f"drafts not delivered: {failed[:1]}")
        conn.commit()
        consumer.commit(asynchronous=False)
    secs = time.monotonic() - started if started else 0.0
    print(json.dumps({"rows": written, "secs": round(secs, 3)}))
    consumer.close()
    return 0

if __name__ == "__main__":
    sys.exit(main())

//! What only the Kafka bus has, against a real broker (feature `kafka`) named by
//! `SWIMLANE_TEST_KAFKA=host:port` (skipped when it is unset; `mock`: librdkafka's
//! in-process mock cluster). What every bus must do is the bus conformance suite
//! (`tests/conformance_kafka.rs`); the outbox and the relay have unit tests in
//! `src/kafka.rs`.
#![cfg(feature = "kafka")]
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use swimlane_bus::conformance::{BusUnderTest, KafkaBusUnderTest};
use swimlane_bus::{positions, Consumer};

/// A member restarted after the group's Kafka offset was moved behind the store's
/// position resumes at the store's position: Kafka offsets are for lag monitoring only.
#[test]
fn a_restarted_consumer_reads_from_the_store_position_not_kafkas_offset() {
    let bus = match KafkaBusUnderTest::from_env() {
        Ok(b) => b,
        Err(reason) => return eprintln!("skipped: {reason}"),
    };
    let topic = bus.topic("restart").unwrap();
    let events: Vec<(String, String)> = (0..10).map(|i| ("u".into(), format!("{i}"))).collect();
    bus.publish(&topic, &events).unwrap();
    let partition = swimlane_bus::partition_for("u", bus.partitions());
    let group = swimlane_bus::member_id("g");

    let mut c = bus.kafka_member(&group, &topic).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + bus.patience();
    while seen.len() < 6 && Instant::now() < deadline {
        if let Some(d) = c.poll(6 - seen.len(), Duration::from_millis(200)).unwrap() {
            bus.db()
                .transact(|tx| positions::commit(tx, bus.keys(), &d.fence, d.next_offset()))
                .unwrap();
            c.committed(&d.fence, d.next_offset());
            seen.extend(d.records.iter().map(|r| r.offset));
        }
    }
    assert_eq!(seen, (0..6).collect::<Vec<u64>>());
    // Move the group's Kafka offset behind the store's position.
    c.commit_kafka_offset(partition, 2).unwrap();
    c.close().unwrap();
    drop(c);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, partition as i32);
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bus.bootstrap())
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        committed
            .find_partition(&topic, partition as i32)
            .unwrap()
            .offset(),
        Offset::Offset(2),
        "the Kafka offset is behind the store's"
    );
    drop(reader);
    let stored = bus
        .db()
        .transact(|tx| positions::position(tx, bus.keys(), &group, &topic, partition))
        .unwrap();
    assert_eq!(stored, 6);

    let mut c = bus.kafka_member(&group, &topic).unwrap();
    let mut rest = Vec::new();
    let deadline = Instant::now() + bus.patience();
    while rest.len() < 4 && Instant::now() < deadline {
        if let Some(d) = c.poll(4, Duration::from_millis(200)).unwrap() {
            rest.extend(
                d.records
                    .iter()
                    .map(|r| (r.offset, String::from_utf8(r.payload.clone()).unwrap())),
            );
        }
    }
    let offsets: Vec<u64> = rest.iter().map(|r| r.0).collect();
    assert_eq!(offsets, vec![6, 7, 8, 9], "resumed at the store's position");
    let payloads: Vec<&str> = rest.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(payloads, vec!["6", "7", "8", "9"]);
    c.close().unwrap();
}

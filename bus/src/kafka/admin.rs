//! Topic administration: names with the deployment prefix, creation with a checked
//! partition count.
use super::*;

/// The Kafka name of a topic or consumer group: `prefix` + `name`. A prefix lets
/// several deployments (or tests) share one Kafka cluster; the store always uses the
/// unprefixed names.
pub fn kafka_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// Create `topics` with `partitions` partitions each, unless they exist. A topic that
/// exists with another partition count is an error (the partitioner depends on it).
pub fn create_topics(
    bootstrap: &str,
    topics: &[&str],
    partitions: u32,
    replication: i32,
) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = base_config(bootstrap)
        .create()
        .map_err(|e| kafka_err("creating the admin client", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions as i32, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(&new, &opts))
        .map_err(|e| kafka_err("creating topics", e))?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, partitions, "topic created"),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %t, "topic exists")
            }
            Err((t, code)) => {
                return Err(BusError::Kafka(format!("creating topic {t}: {code}")));
            }
        }
    }
    for t in topics {
        let n = topic_partitions(&admin, t)?;
        if n != partitions {
            return Err(BusError::Kafka(format!(
                "topic {t} has {n} partitions, expected {partitions}"
            )));
        }
    }
    Ok(())
}

fn topic_partitions<C: ClientContext>(
    admin: &AdminClient<C>,
    topic: &str,
) -> Result<u32, BusError> {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| kafka_err(&format!("metadata of {topic}"), e))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as u32)
        .unwrap_or(0))
}

//! The relay: moves committed outbox entries into Kafka, one leader per store.
use super::*;

#[derive(Default)]
struct DeliveryCounts {
    ok: AtomicUsize,
    failed: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

/// The relay producer's context: counts acknowledgements.
#[derive(Default)]
pub struct RelayContext {
    counts: DeliveryCounts,
}

impl ClientContext for RelayContext {}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.counts.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err((e, _)) => {
                self.counts.failed.fetch_add(1, Ordering::SeqCst);
                *self.counts.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }
}

/// The relay's idempotent producer.
pub type RelayProducer = BaseProducer<RelayContext>;

/// An idempotent producer for the relay.
pub fn relay_producer(bootstrap: &str) -> Result<RelayProducer, BusError> {
    base_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Sent at once: a round's entries are produced together anyway, and a linger
        // only delays each hop (bench/README.md, "The relay without a linger": 2 ms
        // made the paced overhead over tansu 3-10 ms longer, with no more throughput).
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create_with_context(RelayContext::default())
        .map_err(|e| kafka_err("creating the relay producer", e))
}

/// How the relay behaves.
#[derive(Clone)]
pub struct RelayOptions {
    /// Unique per live process.
    pub member: String,
    /// Entries per round.
    pub batch: usize,
    /// Longest wait when the outbox is empty: the relay waits for the store to change
    /// (`Db::change_watch`) and looks again at the latest after this long.
    pub idle: Duration,
    /// A dead relay's lease is taken after this long.
    pub lease_ttl: Duration,
    /// Longest wait for Kafka's acknowledgements of one round.
    pub ack_timeout: Duration,
    /// Prefix of every Kafka topic name ([`kafka_name`]).
    pub topic_prefix: String,
    pub now_ms: NowMs,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            member: crate::member_id("relay"),
            batch: 256,
            idle: Duration::from_millis(10),
            lease_ttl: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            topic_prefix: String::new(),
            now_ms: crate::embedded::system_now_ms(),
        }
    }
}

/// Moves committed outbox entries into Kafka. See the module doc.
pub struct Relay {
    db: Db,
    keys: Keys,
    producer: RelayProducer,
    opts: RelayOptions,
    fence: Option<Fence>,
    renewed: Option<Instant>,
    partitions: HashMap<String, u32>,
}

impl Relay {
    pub fn new(db: Db, keys: Keys, producer: RelayProducer, opts: RelayOptions) -> Self {
        Relay {
            db,
            keys,
            producer,
            opts,
            fence: None,
            renewed: None,
            partitions: HashMap::new(),
        }
    }

    /// Whether this relay holds the relay lease (after its last round).
    pub fn is_leader(&self) -> bool {
        self.fence.is_some()
    }

    fn partitions_of(&mut self, topic: &str) -> Result<u32, BusError> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(*n);
        }
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| kafka_err(&format!("metadata of {topic}"), e))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .unwrap_or(0);
        if n == 0 {
            return Err(BusError::Kafka(format!(
                "topic {topic} does not exist; create it first (`swimlane admin create-topics`)"
            )));
        }
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    /// Hold (or take) the relay lease; renews at a third of its ttl.
    fn lead(&mut self) -> Result<bool, BusError> {
        let now = self.opts.now_ms.now_ms();
        let ttl = self.opts.lease_ttl.as_millis() as u64;
        if self.fence.is_some()
            && self
                .renewed
                .is_some_and(|t| t.elapsed() < self.opts.lease_ttl / 3)
        {
            return Ok(true);
        }
        let (keys, member) = (&self.keys, &self.opts.member);
        let fence = self.fence.clone();
        let got = self.db.transact(|tx| match &fence {
            Some(f) if positions::renew(tx, keys, f, member, now, ttl)? => Ok(Some(f.clone())),
            _ => positions::acquire(
                tx,
                keys,
                RELAY_GROUP,
                RELAY_TOPIC,
                0,
                member,
                now,
                ttl,
                false,
            ),
        })?;
        if got.is_some() != self.fence.is_some() {
            tracing::info!(member = %self.opts.member, leader = got.is_some(), "outbox relay lease changed");
        }
        self.fence = got;
        self.renewed = Some(Instant::now());
        Ok(self.fence.is_some())
    }

    /// One round: if leading, relay up to `batch` entries. Returns how many were
    /// relayed (and deleted).
    pub fn round(&mut self) -> Result<usize, BusError> {
        if !self.lead()? {
            return Ok(0);
        }
        let (keys, batch) = (&self.keys, self.opts.batch);
        let entries = self.db.transact(|tx| read_outbox(tx, keys, batch))?;
        if entries.is_empty() {
            return Ok(0);
        }
        let ctx = self.producer.context().clone();
        let counts = &ctx.counts;
        counts.ok.store(0, Ordering::SeqCst);
        counts.failed.store(0, Ordering::SeqCst);
        let mut sent = 0usize;
        let mut done = Vec::with_capacity(entries.len());
        for (k, e) in &entries {
            let e = match e {
                Ok(e) => e,
                Err(reason) => {
                    // Nothing can ever relay it; keep the rest moving.
                    tracing::error!(reason, "dropping an undecodable outbox entry");
                    done.push(k.clone());
                    continue;
                }
            };
            let topic = kafka_name(&self.opts.topic_prefix, &e.topic);
            let p = partition_for(&e.key, self.partitions_of(&topic)?);
            let entry_id = hex_of(k);
            let mut record = BaseRecord::to(&topic)
                .key(&e.key)
                .payload(&e.payload)
                .partition(p as i32)
                .headers(OwnedHeaders::new().insert(Header {
                    key: OUTBOX_ENTRY_HEADER,
                    value: Some(entry_id.as_bytes()),
                }));
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((err, _)) => return Err(kafka_err("producing", err)),
                }
            }
            sent += 1;
            done.push(k.clone());
        }
        let deadline = Instant::now() + self.opts.ack_timeout;
        while counts.ok.load(Ordering::SeqCst) + counts.failed.load(Ordering::SeqCst) < sent {
            if Instant::now() >= deadline {
                return Err(BusError::Kafka(format!(
                    "{} of {sent} relayed records unacknowledged after {:?}",
                    sent - counts.ok.load(Ordering::SeqCst),
                    self.opts.ack_timeout
                )));
            }
            self.producer.poll(Duration::from_millis(5));
        }
        if counts.failed.load(Ordering::SeqCst) > 0 {
            return Err(BusError::Kafka(format!(
                "{} of {sent} relayed records failed: {}",
                counts.failed.load(Ordering::SeqCst),
                counts
                    .last_error
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_default()
            )));
        }
        self.db.transact(|tx| {
            for k in &done {
                tx.clear(k)?;
            }
            Ok(())
        })?;
        Ok(done.len())
    }

    /// Relay until `stop()`; then one last round, if the previous one succeeded, so a
    /// draining process leaves little behind (another process's relay, or the next
    /// start, relays the rest).
    pub fn run(&mut self, stop: &dyn Fn() -> bool) {
        let mut backoff = Duration::from_millis(50);
        let mut healthy = false;
        // Made before the first round, so no commit after it goes unnoticed.
        let mut watch = self.db.change_watch();
        while !stop() {
            match self.round() {
                Ok(n) => {
                    healthy = true;
                    backoff = Duration::from_millis(50);
                    if n == 0 {
                        swimlane_store::watch::wait_or_sleep(&mut watch, self.opts.idle);
                    }
                }
                Err(e) => {
                    healthy = false;
                    tracing::warn!(error = %e, "outbox relay round failed; backing off");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if healthy {
            if let Err(e) = self.round() {
                tracing::warn!(error = %e, "last outbox relay round failed");
            }
        }
        if let Some(f) = self.fence.take() {
            let (keys, member) = (&self.keys, &self.opts.member);
            let _ = self
                .db
                .transact(|tx| positions::release(tx, keys, &f, member));
        }
    }
}

/// Relay `db`'s outbox into Kafka through `producer` until `stop()`, with default
/// options.
pub fn run_relay(db: Db, keys: Keys, producer: RelayProducer, stop: &dyn Fn() -> bool) {
    Relay::new(db, keys, producer, RelayOptions::default()).run(stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_store::embedded::EmbeddedBackend;

    #[test]
    fn one_relay_leads_per_store_and_another_takes_over_when_it_stops() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        let relay = |member: &str| {
            Relay::new(
                db.clone(),
                keys.clone(),
                // No broker needed: the outbox stays empty, so nothing is produced.
                relay_producer("127.0.0.1:1").unwrap(),
                RelayOptions {
                    member: member.into(),
                    ..RelayOptions::default()
                },
            )
        };
        let (mut a, mut b) = (relay("a"), relay("b"));
        assert_eq!(a.round().unwrap(), 0);
        assert_eq!(b.round().unwrap(), 0);
        assert!(a.is_leader());
        assert!(!b.is_leader(), "the lease is held by a");
        a.run(&|| true); // stops at once and releases the lease
        assert_eq!(b.round().unwrap(), 0);
        assert!(b.is_leader(), "b takes over once a released the lease");
    }
}

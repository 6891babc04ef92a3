//! A member of a Kafka consumer group whose positions and fences are the store's.
use super::*;

/// How a [`KafkaConsumer`] behaves.
#[derive(Clone)]
pub struct KafkaConsumerOptions {
    pub bootstrap: String,
    pub group: String,
    pub topic: String,
    /// Unique per live process; the store lease's owner.
    pub member: String,
    /// Stored with the lease (Kafka's coordinator decides ownership; the lease only
    /// carries the epoch).
    pub lease_ttl: Duration,
    /// Kafka's `session.timeout.ms`.
    pub session_timeout: Duration,
    pub now_ms: NowMs,
    /// Prefix of the Kafka topic and group names ([`kafka_name`]); the store keeps
    /// positions under the unprefixed names.
    pub topic_prefix: String,
    /// Extra librdkafka settings (tests).
    pub extra: Vec<(String, String)>,
}

impl KafkaConsumerOptions {
    pub fn new(bootstrap: &str, group: &str, topic: &str) -> Self {
        KafkaConsumerOptions {
            bootstrap: bootstrap.into(),
            group: group.into(),
            topic: topic.into(),
            member: crate::member_id(group),
            lease_ttl: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            now_ms: crate::embedded::system_now_ms(),
            topic_prefix: String::new(),
            extra: Vec::new(),
        }
    }

    /// The topic's name in Kafka.
    pub fn kafka_topic(&self) -> String {
        kafka_name(&self.topic_prefix, &self.topic)
    }

    /// The group's id in Kafka.
    pub fn kafka_group(&self) -> String {
        kafka_name(&self.topic_prefix, &self.group)
    }
}

/// A Kafka member's partitions: each with the records fetched from its cursor on and
/// not yet committed.
#[derive(Default)]
struct OwnedState {
    owned: positions::Holdings<VecDeque<Record>>,
    /// Set when a rebalance callback could not reach the store.
    error: Option<String>,
}

/// The consumer's context: takes fences on assignment, drops them on revocation.
pub struct FencingContext {
    db: Db,
    keys: Keys,
    opts: KafkaConsumerOptions,
    state: Arc<Mutex<OwnedState>>,
}

/// Renews the store leases of the partitions this consumer owns
/// ([`positions::keep_leases`]) for as long as the consumer lives. So a lease runs out
/// only when its owner process is gone (or cannot reach the store), which is what the
/// orphan watchdog ([`KafkaConsumer::poll`]) looks for.
fn start_lease_keeper(
    db: Db,
    keys: Keys,
    opts: KafkaConsumerOptions,
    state: Arc<Mutex<OwnedState>>,
) -> Result<positions::LeaseKeeper, BusError> {
    let mine = state.clone();
    let held = move || {
        let st = mine.lock().unwrap();
        st.owned.values().map(|o| o.fence.clone()).collect()
    };
    let keeper = positions::KeeperOptions {
        member: opts.member.clone(),
        lease_ttl: opts.lease_ttl,
        now_ms: opts.now_ms.clone(),
        member_key: None,
    };
    positions::keep_leases(db, keys, keeper, held, move |lost| {
        let mut st = state.lock().unwrap();
        for f in lost {
            positions::drop_lost(&mut st.owned, &f);
        }
    })
}

impl ClientContext for FencingContext {}

impl ConsumerContext for FencingContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<u32> = tpl
                    .elements()
                    .iter()
                    .filter(|e| e.topic() == self.opts.kafka_topic())
                    .map(|e| e.partition() as u32)
                    .collect();
                let now = self.opts.now_ms.now_ms();
                let ttl = self.opts.lease_ttl.as_millis() as u64;
                let (keys, o) = (&self.keys, &self.opts);
                let fences = self.db.transact(|tx| {
                    let mut out = Vec::new();
                    for p in &parts {
                        if let Some(f) = positions::acquire(
                            tx, keys, &o.group, &o.topic, *p, &o.member, now, ttl, true,
                        )? {
                            out.push(f);
                        }
                    }
                    Ok(out)
                });
                let mut st = self.state.lock().unwrap();
                let mut assign = TopicPartitionList::new();
                match fences {
                    Ok(fences) => {
                        for f in fences {
                            tracing::info!(group = %f.group, topic = %f.topic, partition = f.partition, epoch = f.epoch, offset = f.offset, "partition assigned; seeking to the stored position");
                            let _ = assign.add_partition_offset(
                                &self.opts.kafka_topic(),
                                f.partition as i32,
                                Offset::Offset(f.offset as i64),
                            );
                            st.owned.insert(
                                f.partition,
                                positions::Held {
                                    cursor: f.offset,
                                    fence: f,
                                    buffered: VecDeque::new(),
                                },
                            );
                        }
                    }
                    Err(e) => {
                        // Take nothing: no fence, no fetching. The error surfaces from
                        // poll, and the stage loop backs off; leaving the group makes
                        // the coordinator hand the partitions to someone else.
                        tracing::error!(error = %e, "could not fence assigned partitions");
                        st.error = Some(e.to_string());
                    }
                }
                drop(st);
                if let Err(e) = consumer.assign(&assign) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut st = self.state.lock().unwrap();
                for e in tpl.elements() {
                    if let Some(o) = st.owned.remove(&(e.partition() as u32)) {
                        tracing::info!(topic = %o.fence.topic, partition = o.fence.partition, epoch = o.fence.epoch, "partition revoked; fence dropped");
                    }
                }
                drop(st);
                let _ = consumer.unassign();
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                self.state.lock().unwrap().owned.clear();
                let _ = consumer.unassign();
            }
        }
    }
}

/// A member of a Kafka consumer group on one topic, positions kept in the store.
///
/// Orphan watchdog: while it owns partitions, a member also checks, every third of
/// the lease time to live, the leases of the topic's other partitions. A partition
/// whose lease has run out (its owner process is gone: live owners' leases are
/// renewed by its lease keeper thread) and stays out for a whole time to live, although
/// the coordinator should long since have given it to a live member, makes the
/// member leave and rejoin the group, so that the coordinator assigns every partition
/// anew. (tansu 0.6.0 drops a member that stops heartbeating but keeps the group's
/// generation and old assignment, so without this its partitions would wait for the
/// next member to join; with a Kafka broker the watchdog does not fire.)
pub struct KafkaConsumer {
    consumer: BaseConsumer<FencingContext>,
    next_partition: u32,
    commit_kafka_offsets: bool,
    _keeper: positions::LeaseKeeper,
    watched: Option<Instant>,
    /// Partitions of the topic (from Kafka's metadata, once known).
    partitions: Option<u32>,
    /// Partitions seen with a run-out lease, since when.
    orphaned_since: BTreeMap<u32, Instant>,
}

impl KafkaConsumer {
    /// Join `opts.group` on `opts.topic`.
    pub fn new(db: Db, keys: Keys, opts: KafkaConsumerOptions) -> Result<Self, BusError> {
        let mut c = base_config(&opts.bootstrap);
        c.set("group.id", opts.kafka_group())
            // tansu answers a waiting fetch only when this runs out (shared/facts.md);
            // a real Kafka broker answers as soon as data arrives.
            .set("fetch.wait.max.ms", "10")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Only used when no position is given, which never happens: every
            // assignment carries the stored position.
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                opts.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (opts.session_timeout.as_millis() / 5).max(100).to_string(),
            )
            .set("partition.assignment.strategy", "range");
        for (k, v) in &opts.extra {
            c.set(k, v);
        }
        let topic = opts.kafka_topic();
        let state = Arc::new(Mutex::new(OwnedState::default()));
        let keeper = start_lease_keeper(db.clone(), keys.clone(), opts.clone(), state.clone())?;
        let ctx = FencingContext {
            db,
            keys,
            opts,
            state,
        };
        let consumer: BaseConsumer<FencingContext> = c
            .create_with_context(ctx)
            .map_err(|e| kafka_err("creating the consumer", e))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_err(&format!("subscribing to {topic}"), e))?;
        Ok(KafkaConsumer {
            consumer,
            next_partition: 0,
            commit_kafka_offsets: true,
            _keeper: keeper,
            watched: None,
            partitions: None,
            orphaned_since: BTreeMap::new(),
        })
    }

    /// Leave the group: unsubscribe, serve the revocation (for up to half a second),
    /// and drop every fence.
    fn leave_group(&mut self) {
        self.consumer.unsubscribe();
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let _ = self.consumer.poll(Duration::from_millis(50));
            if self
                .consumer
                .context()
                .state
                .lock()
                .unwrap()
                .owned
                .is_empty()
            {
                break;
            }
        }
        self.consumer.context().state.lock().unwrap().owned.clear();
    }

    /// The orphan watchdog (see the type's doc); returns whether it made the member
    /// rejoin the group.
    fn watch_orphans(&mut self) -> Result<bool, BusError> {
        let ctx = self.consumer.context();
        let ttl = ctx.opts.lease_ttl;
        if self.watched.is_some_and(|t| t.elapsed() < ttl / 3) {
            return Ok(false);
        }
        self.watched = Some(Instant::now());
        let mine: Vec<u32> = ctx.state.lock().unwrap().owned.keys().copied().collect();
        if mine.is_empty() {
            // Not (yet) a member with work: the group may be forming.
            self.orphaned_since.clear();
            return Ok(false);
        }
        let topic = ctx.opts.kafka_topic();
        let n = match self.partitions {
            Some(n) => n,
            None => {
                let md = self
                    .consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .map_err(|e| kafka_err(&format!("metadata of {topic}"), e))?;
                let n = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len() as u32)
                    .unwrap_or(0);
                if n == 0 {
                    return Ok(false);
                }
                self.partitions = Some(n);
                n
            }
        };
        let now = ctx.opts.now_ms.now_ms();
        let (keys, o) = (&ctx.keys, &ctx.opts);
        let expired: Vec<u32> = ctx.db.transact(|tx| {
            let mut out = Vec::new();
            for p in (0..n).filter(|p| !mine.contains(p)) {
                if positions::owner(tx, keys, &o.group, &o.topic, p)?
                    .is_some_and(|w| w.expires_ms <= now)
                {
                    out.push(p);
                }
            }
            Ok(out)
        })?;
        self.orphaned_since.retain(|p, _| expired.contains(p));
        for p in &expired {
            self.orphaned_since.entry(*p).or_insert_with(Instant::now);
        }
        let orphans: Vec<u32> = self
            .orphaned_since
            .iter()
            .filter(|(_, t)| t.elapsed() >= ttl)
            .map(|(p, _)| *p)
            .collect();
        if orphans.is_empty() {
            return Ok(false);
        }
        tracing::warn!(?orphans, "partitions without a live owner for a whole lease time to live; rejoining the group so the coordinator assigns them anew");
        self.orphaned_since.clear();
        self.leave_group();
        self.consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_err(&format!("subscribing to {topic}"), e))?;
        Ok(true)
    }

    /// Whether to also commit Kafka offsets after store commits (lag monitoring only).
    pub fn set_commit_kafka_offsets(&mut self, on: bool) {
        self.commit_kafka_offsets = on;
    }

    /// Commit `offset` as the group's Kafka offset of `partition`, synchronously. Kafka
    /// offsets only feed lag monitoring; this consumer never reads them (operators,
    /// tests).
    pub fn commit_kafka_offset(&self, partition: u32, offset: u64) -> Result<(), BusError> {
        let topic = &self.consumer.context().opts.kafka_topic();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))
            .map_err(|e| kafka_err("offset list", e))?;
        self.consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
            kafka_err(
                &format!("committing the Kafka offset of {topic}/{partition}"),
                e,
            )
        })
    }

    /// Take one message from Kafka into its partition's buffer. Returns false on
    /// timeout.
    fn fetch_one(&mut self, timeout: Duration) -> Result<bool, BusError> {
        let topic = self.consumer.context().opts.kafka_topic();
        match self.consumer.poll(timeout) {
            None => Ok(false),
            Some(Err(KafkaError::PartitionEOF(_))) => Ok(true),
            Some(Err(e)) => Err(kafka_err(&format!("polling {topic}"), e)),
            Some(Ok(m)) => {
                let p = m.partition() as u32;
                let offset = m.offset() as u64;
                let mut st = self.consumer.context().state.lock().unwrap();
                if let Some(o) = st.owned.get_mut(&p) {
                    let next = o.buffered.back().map(|r| r.offset + 1).unwrap_or(o.cursor);
                    if offset >= next {
                        let key = m
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .unwrap_or_default();
                        o.buffered.push_back(Record {
                            offset,
                            key,
                            payload: m.payload().unwrap_or_default().to_vec(),
                        });
                    }
                }
                Ok(true)
            }
        }
    }

    fn take_delivery(&mut self, max_records: usize) -> Option<Delivery> {
        let st = self.consumer.context().state.lock().unwrap();
        let parts: Vec<u32> = st
            .owned
            .iter()
            .filter(|(_, o)| !o.buffered.is_empty())
            .map(|(p, _)| *p)
            .collect();
        if parts.is_empty() {
            return None;
        }
        let p = parts
            .iter()
            .copied()
            .find(|p| *p >= self.next_partition)
            .unwrap_or(parts[0]);
        self.next_partition = p + 1;
        let o = &st.owned[&p];
        let mut fence = o.fence.clone();
        fence.offset = o.cursor;
        Some(Delivery {
            fence,
            records: o.buffered.iter().take(max_records).cloned().collect(),
        })
    }
}

const MAX_BUFFERED: usize = 10_000;

/// The high watermark of `topic`/`partition` that `consumer`'s last fetch response
/// carried (librdkafka's `rd_kafka_get_watermark_offsets`, which the `rdkafka` crate
/// does not wrap): no request to the broker. `None` before any fetch response.
fn cached_high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: u32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is live for `consumer`'s lifetime, `topic` is a
    // NUL-terminated string that outlives the call, and librdkafka only writes the two
    // integers it is given.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition as i32,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

impl Consumer for KafkaConsumer {
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Option<Delivery>, BusError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.consumer.context().state.lock().unwrap().error.take() {
                return Err(BusError::Kafka(format!(
                    "fencing assigned partitions failed: {e}"
                )));
            }
            self.watch_orphans()?;
            // Serve rebalances and take what has arrived without waiting.
            let buffered: usize = {
                let st = self.consumer.context().state.lock().unwrap();
                st.owned.values().map(|o| o.buffered.len()).sum()
            };
            let mut n = 0;
            while buffered + n < MAX_BUFFERED && n < max.max(1) * 4 {
                if !self.fetch_one(Duration::ZERO)? {
                    break;
                }
                n += 1;
            }
            if let Some(d) = self.take_delivery(max.max(1)) {
                return Ok(Some(d));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.fetch_one((deadline - now).min(Duration::from_millis(100)))?;
        }
    }

    fn committed(&mut self, fence: &Fence, next_offset: u64) {
        let mut st = self.consumer.context().state.lock().unwrap();
        if let Some(o) = positions::advance(&mut st.owned, fence, next_offset) {
            while o.buffered.front().is_some_and(|r| r.offset < next_offset) {
                o.buffered.pop_front();
            }
        }
        drop(st);
        if self.commit_kafka_offsets {
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(
                    &self.consumer.context().opts.kafka_topic(),
                    fence.partition as i32,
                    Offset::Offset(next_offset as i64),
                )
                .is_ok()
            {
                // For lag monitoring only; the store's position is authoritative.
                let _ = self.consumer.commit(&tpl, CommitMode::Async);
            }
        }
    }

    fn fenced(&mut self, fence: &Fence) {
        let mut st = self.consumer.context().state.lock().unwrap();
        positions::drop_lost(&mut st.owned, fence);
    }

    fn close(&mut self) -> Result<(), BusError> {
        self.leave_group();
        Ok(())
    }

    fn owned_partitions(&self) -> Vec<u32> {
        let st = self.consumer.context().state.lock().unwrap();
        st.owned.keys().copied().collect()
    }

    fn lag(&mut self) -> Result<u64, BusError> {
        let topic = self.consumer.context().opts.kafka_topic();
        let owned: Vec<(String, u32, u64)> = {
            let st = self.consumer.context().state.lock().unwrap();
            st.owned
                .iter()
                .map(|(p, o)| (topic.clone(), *p, o.cursor))
                .collect()
        };
        let mut lag = 0;
        for (topic, p, cursor) in owned {
            // The high watermark every fetch response carries, cached by librdkafka: no
            // request to the broker. Asking the broker instead took 140-155 ms for 8
            // partitions against tansu, once a second in every stage's loop, and a
            // delivery arriving meanwhile waited (bench/README.md, "Over Kafka: the
            // lag query"). Only a partition not fetched yet is asked about.
            let high = match cached_high_watermark(&self.consumer, &topic, p) {
                Some(high) => high,
                None => {
                    self.consumer
                        .fetch_watermarks(&topic, p as i32, Duration::from_secs(2))
                        .map_err(|e| kafka_err(&format!("watermarks of {topic}/{p}"), e))?
                        .1
                }
            };
            lag += (high.max(0) as u64).saturating_sub(cursor);
        }
        Ok(lag)
    }
}

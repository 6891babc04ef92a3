//! The key layout: every key swimlane stores, in one place. This doc comment is the
//! schema.
//!
//! All keys are `foundationdb-tuple` encoded under a root subspace
//! `("swimlane", <deployment>)`, so several deployments can share one cluster and a
//! deployment's data can be cleared with one range clear. Values carry their own
//! schema version (see each writer).
//!
//! | key (after the root)                         | value                                  |
//! |----------------------------------------------|----------------------------------------|
//! | `("user", user, "batch", batch_id)`          | batch record (status, digest, counts)  |
//! | `("user", user, "sample", batch_id, chunk)`  | a chunk of the batch's samples         |
//! | `("user", user, "head")`                     | the user's current published version   |
//! | `("user", user, "state")`                    | per-user pipeline state (convergence)  |
//! | `("user", user, "live", version, what)`      | an 8-byte LE count: windows the device's model `version` (0: the base model) classified in the user's uploads (`what` = `windows`), and those it got right (`right`) |
//! | `("user", user, "livestanding")`             | where the user is counted in the fleet's live statistics (`swimlane_state::LiveStanding`) |
//! | `("user", user, "uploads", day)`             | an 8-byte LE count of the user's uploads staged on UTC day `day` (days since the epoch; only the current day's is kept) |
//! | `("model", user, version)`                   | model version record (metrics, lineage)|
//! | `("blob", blob_id)` / `("blob", blob_id, gen, i)` | blob header / chunk `i` of generation `gen` (`swimlane_store::blob`) |
//! | `("token", sha256(token))`                   | the user a bearer token belongs to     |
//! | `("pos", group, topic, partition)`           | a consumer group's queue position      |
//! | `("outbox", seq)`                            | an event waiting for the relay         |
//! | `("log", topic, partition, offset)`          | the embedded bus's durable log         |
//! | `("loghead", topic, partition)`              | next offset of an embedded log partition|
//! | `("lease", group, topic, partition)`         | partition owner and fencing epoch      |
//! | `("member", group, topic, member)`           | a live consumer's heartbeat            |
//! | `("run", user, run_id)`                      | a training run and its verdict         |
//! | `("pending", staged_at_ms, user, batch_id)`  | empty: a batch staged and not yet settled (operations: the oldest one's age) |
//! | `("stat", name, index)`                      | an 8-byte LE counter kept with `atomic_add` (operations statistics) |
//! | `("forgotten", pseudonym(user))`             | a user being erased or erased (`records::ErasureRecord`): names the user only while the erasure runs |
//!
//! Invariant: a user's data lives only under keys that contain that user's id as the
//! second tuple element (`user`, `model`), so a range read under one user's prefix can
//! never return another user's samples. (`pending` keys name a user and a batch but
//! hold no data; `stat` counters are over all users.)
use foundationdb_tuple::Subspace;

/// The key layout of one deployment. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Keys {
    root: Subspace,
}

impl Keys {
    /// The layout under `("swimlane", deployment)`.
    pub fn new(deployment: &str) -> Self {
        Keys {
            root: Subspace::all().subspace(&("swimlane", deployment)),
        }
    }

    /// The root prefix: every key of this deployment starts with it.
    pub fn root(&self) -> &[u8] {
        self.root.bytes()
    }

    /// Prefix of everything stored for `user` under `("user", user)`.
    pub fn user_prefix(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("user", user)).into_bytes()
    }
    pub fn batch(&self, user: &str, batch: &str) -> Vec<u8> {
        self.root.pack(&("user", user, "batch", batch))
    }
    /// Prefix of every batch record of `user`.
    pub fn batches(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("user", user, "batch")).into_bytes()
    }
    /// The batch id of a key made by [`Keys::batch`] for `user`.
    pub fn batch_id_of(&self, user: &str, key: &[u8]) -> Option<String> {
        self.root
            .subspace(&("user", user, "batch"))
            .unpack::<String>(key)
            .ok()
    }
    /// The version of a key made by [`Keys::model_version`] for `user`.
    pub fn version_of(&self, user: &str, key: &[u8]) -> Option<u64> {
        self.root.subspace(&("model", user)).unpack::<u64>(key).ok()
    }
    pub fn sample_chunk(&self, user: &str, batch: &str, chunk: u32) -> Vec<u8> {
        self.root.pack(&("user", user, "sample", batch, chunk))
    }
    /// Prefix of every sample chunk of one batch.
    pub fn samples_of_batch(&self, user: &str, batch: &str) -> Vec<u8> {
        self.root
            .subspace(&("user", user, "sample", batch))
            .into_bytes()
    }
    /// Prefix of every sample chunk of `user`.
    pub fn samples(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("user", user, "sample")).into_bytes()
    }
    pub fn head(&self, user: &str) -> Vec<u8> {
        self.root.pack(&("user", user, "head"))
    }
    pub fn user_state(&self, user: &str) -> Vec<u8> {
        self.root.pack(&("user", user, "state"))
    }
    /// The count of `user`'s uploads staged on UTC day `day` (days since the epoch).
    pub fn uploads_on(&self, user: &str, day: u64) -> Vec<u8> {
        self.root.pack(&("user", user, "uploads", day))
    }
    /// Where `user` is counted in the fleet's live statistics.
    pub fn live_standing(&self, user: &str) -> Vec<u8> {
        self.root.pack(&("user", user, "livestanding"))
    }
    /// `user`'s live count `what` (`"windows"` or `"right"`) of model `version` (0: the
    /// base model).
    pub fn live(&self, user: &str, version: u64, what: &str) -> Vec<u8> {
        self.root.pack(&("user", user, "live", version, what))
    }
    /// Prefix of every live count of `user`.
    pub fn lives(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("user", user, "live")).into_bytes()
    }
    /// `(version, what)` of a key made by [`Keys::live`] for `user`.
    pub fn live_of(&self, user: &str, key: &[u8]) -> Option<(u64, String)> {
        self.root
            .subspace(&("user", user, "live"))
            .unpack::<(u64, String)>(key)
            .ok()
    }
    /// Prefix of every daily upload count of `user`.
    pub fn uploads(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("user", user, "uploads")).into_bytes()
    }
    pub fn model_version(&self, user: &str, version: u64) -> Vec<u8> {
        self.root.pack(&("model", user, version))
    }
    /// Prefix of every model version of `user`.
    pub fn model_versions(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("model", user)).into_bytes()
    }
    /// Prefix under which the blob `blob_id` (header and chunks) is stored.
    pub fn blob(&self, blob_id: &str) -> Vec<u8> {
        self.root.subspace(&("blob", blob_id)).into_bytes()
    }
    pub fn token(&self, token_hash_hex: &str) -> Vec<u8> {
        self.root.pack(&("token", token_hash_hex))
    }
    pub fn position(&self, group: &str, topic: &str, partition: u32) -> Vec<u8> {
        self.root.pack(&("pos", group, topic, partition))
    }
    /// Prefix of every consumer group's position.
    pub fn positions(&self) -> Vec<u8> {
        self.root.subspace(&("pos",)).into_bytes()
    }
    /// `(group, topic, partition)` of a key made by [`Keys::position`].
    pub fn position_of(&self, key: &[u8]) -> Option<(String, String, u32)> {
        self.unpack_under("pos", key)
    }
    pub fn outbox(&self, seq: u64) -> Vec<u8> {
        self.root.pack(&("outbox", seq))
    }
    /// Prefix of the whole outbox.
    pub fn outbox_prefix(&self) -> Vec<u8> {
        self.root.subspace(&("outbox",)).into_bytes()
    }
    pub fn log_entry(&self, topic: &str, partition: u32, offset: u64) -> Vec<u8> {
        self.root.pack(&("log", topic, partition, offset))
    }
    /// Prefix of one partition of the embedded log.
    pub fn log_partition(&self, topic: &str, partition: u32) -> Vec<u8> {
        self.root.subspace(&("log", topic, partition)).into_bytes()
    }
    pub fn log_head(&self, topic: &str, partition: u32) -> Vec<u8> {
        self.root.pack(&("loghead", topic, partition))
    }
    /// Prefix of every partition's [`Keys::log_head`] of `topic`.
    pub fn log_heads(&self, topic: &str) -> Vec<u8> {
        self.root.subspace(&("loghead", topic)).into_bytes()
    }
    /// The partition of a key made by [`Keys::log_head`] for `topic`.
    pub fn log_head_partition(&self, topic: &str, key: &[u8]) -> Option<u32> {
        self.root
            .subspace(&("loghead", topic))
            .unpack::<u32>(key)
            .ok()
    }
    pub fn lease(&self, group: &str, topic: &str, partition: u32) -> Vec<u8> {
        self.root.pack(&("lease", group, topic, partition))
    }
    pub fn member(&self, group: &str, topic: &str, member: &str) -> Vec<u8> {
        self.root.pack(&("member", group, topic, member))
    }
    /// Prefix of every member heartbeat of one group on one topic.
    pub fn members(&self, group: &str, topic: &str) -> Vec<u8> {
        self.root.subspace(&("member", group, topic)).into_bytes()
    }
    pub fn run(&self, user: &str, run_id: &str) -> Vec<u8> {
        self.root.pack(&("run", user, run_id))
    }
    /// Prefix of every run record of `user`.
    pub fn runs(&self, user: &str) -> Vec<u8> {
        self.root.subspace(&("run", user)).into_bytes()
    }
    /// The index entry of a batch staged at `staged_at_ms` and not yet settled
    /// (published, rejected or deferred); the first key under [`Keys::pending_batches`]
    /// is the oldest such batch.
    pub fn pending_batch(&self, staged_at_ms: u64, user: &str, batch: &str) -> Vec<u8> {
        self.root.pack(&("pending", staged_at_ms, user, batch))
    }
    /// Prefix of every [`Keys::pending_batch`] entry.
    pub fn pending_batches(&self) -> Vec<u8> {
        self.root.subspace(&("pending",)).into_bytes()
    }
    /// `(staged_at_ms, user, batch_id)` of a key made by [`Keys::pending_batch`].
    pub fn pending_batch_of(&self, key: &[u8]) -> Option<(u64, String, String)> {
        self.unpack_under("pending", key)
    }
    /// The erasure record of `user`, keyed by [`Keys::pseudonym`] so that once the
    /// erasure is done no key names the user.
    pub fn forgotten(&self, user: &str) -> Vec<u8> {
        self.root.pack(&("forgotten", Self::pseudonym(user)))
    }
    /// Prefix of every erasure record.
    pub fn forgottens(&self) -> Vec<u8> {
        self.root.subspace(&("forgotten",)).into_bytes()
    }
    /// SHA-256 (hex) of a user id under a fixed domain: the same for the same id, and
    /// not the id. Pseudonymous, not anonymous: whoever knows an id can compute it.
    pub fn pseudonym(user: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"swimlane-forgotten-user\0");
        h.update(user.as_bytes());
        hex::encode(h.finalize())
    }
    /// Prefix of every token record.
    pub fn tokens(&self) -> Vec<u8> {
        self.root.subspace(&("token",)).into_bytes()
    }
    /// Prefix of the whole embedded log (every topic and partition).
    pub fn log_all(&self) -> Vec<u8> {
        self.root.subspace(&("log",)).into_bytes()
    }
    /// A statistics counter: `index` of the counter family `name`.
    pub fn stat(&self, name: &str, index: u32) -> Vec<u8> {
        self.root.pack(&("stat", name, index))
    }
    /// The rest of a key under `(name, ...)`, decoded as `T`.
    fn unpack_under<'k, T: foundationdb_tuple::TupleUnpack<'k>>(
        &self,
        name: &str,
        key: &'k [u8],
    ) -> Option<T> {
        self.root.subspace(&(name,)).unpack::<T>(key).ok()
    }

    /// Decode the offset from a key made by [`Keys::log_entry`].
    pub fn log_offset(&self, topic: &str, partition: u32, key: &[u8]) -> Option<u64> {
        self.root
            .subspace(&("log", topic, partition))
            .unpack::<u64>(key)
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_users_prefix_never_covers_anothers_keys() {
        let k = Keys::new("test");
        // "alice" is a byte prefix of "alice2"; tuple encoding must still separate them.
        let p = k.user_prefix("alice");
        assert!(k.batch("alice", "b1").starts_with(&p));
        assert!(!k.batch("alice2", "b1").starts_with(&p));
        assert!(!k
            .sample_chunk("alice2", "b1", 0)
            .starts_with(&k.samples("alice")));
        assert!(!k
            .model_version("alice2", 1)
            .starts_with(&k.model_versions("alice")));
    }

    #[test]
    fn versions_and_offsets_sort_numerically() {
        let k = Keys::new("test");
        assert!(k.model_version("u", 9) < k.model_version("u", 10));
        assert!(k.log_entry("t", 0, 255) < k.log_entry("t", 0, 256));
        assert_eq!(k.log_offset("t", 0, &k.log_entry("t", 0, 4242)), Some(4242));
        assert_eq!(
            k.batch_id_of("u", &k.batch("u", "b-1")).as_deref(),
            Some("b-1")
        );
        assert_eq!(k.version_of("u", &k.model_version("u", 77)), Some(77));
        assert!(k.outbox(1) < k.outbox(1 << 40));
    }

    #[test]
    fn pending_batches_sort_by_staging_time_and_decode() {
        let k = Keys::new("test");
        let (a, b) = (
            k.pending_batch(999, "zed", "b"),
            k.pending_batch(1000, "amy", "a"),
        );
        assert!(a < b, "older first, whatever the user");
        assert!(a.starts_with(&k.pending_batches()));
        assert_eq!(
            k.pending_batch_of(&b),
            Some((1000, "amy".to_string(), "a".to_string()))
        );
        assert!(!k.stat("x", 1).starts_with(&k.pending_batches()));
    }

    #[test]
    fn deployments_do_not_overlap() {
        let a = Keys::new("a");
        let b = Keys::new("ab");
        assert!(!b.head("u").starts_with(a.root()));
    }
}

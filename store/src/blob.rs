//! Chunked blobs: byte strings of any size under a caller-given key prefix.
//!
//! # Layout under `prefix` (e.g. `swimlane_core::keys::Keys::blob(id)`)
//! - `prefix` itself → the header, [`HEADER_LEN`] bytes: schema version byte
//!   ([`SCHEMA_VERSION`]), total length (u64 LE), SHA-256 of the data (32 bytes), chunk
//!   size (u32 LE), chunk count (u32 LE), generation (u64 LE), CRC-32 of the data (u32
//!   LE), CRC-32 of the header's bytes before it (u32 LE). A version 1 header
//!   ([`HEADER_LEN_V1`] bytes) ends after the generation; it is still read, and every
//!   write makes a version 2 one.
//! - `prefix + tuple(generation, i)` → chunk `i` of that generation: [`CHUNK_SIZE`]
//!   bytes, the last one shorter. Every value stays under
//!   [`crate::limits::MAX_VALUE_BYTES`].
//!
//! The blob owns every key starting with `prefix`; store nothing else under it.
//!
//! # Guarantees
//! - A reader sees a whole blob or none: the header is written in the same transaction
//!   as the chunks ([`write_in`]) or after all of them ([`write()`] for large blobs), and
//!   names the generation its chunks live under. Chunks of a generation are never
//!   modified; they are deleted only in the transaction that replaces or deletes the
//!   header pointing at them.
//! - Reads check the length, every chunk's presence and size, and the data's CRC-32
//!   (a version 1 header: its SHA-256), and report [`KvError::Corrupt`] on any mismatch;
//!   an absent header is `Ok(None)`. The SHA-256 is computed once, when the blob is
//!   written, and the header's own CRC-32 covers it, so the digest a read returns is the
//!   written data's. A CRC-32 catches what corrupts stored bytes (a damaged page, chunks
//!   of two writes mixed) for much less CPU: hashing the models every stage reads was
//!   2-3% of the fleet's CPU (bench/README.md). It is no defence against someone who can
//!   write the store, and neither was a SHA-256 stored beside the data.
//! - Replacing a blob is atomic for readers (old or new, never a mix). Concurrent
//!   writers of one prefix: the last header written wins; a multi-transaction write
//!   that dies half-way leaves unreferenced chunks, removed by [`delete_in`].
//!   A delete racing a multi-transaction write of the same prefix can leave a header
//!   whose chunks are gone; readers then get [`KvError::Corrupt`], never wrong bytes.
use foundationdb_tuple::Subspace;
use sha2::{Digest, Sha256};

use crate::error::KvError;
use crate::kv::{Db, RangeOption, Transaction};

/// Header format version written.
pub const SCHEMA_VERSION: u8 = 2;
/// Bytes per chunk (below FDB's 100,000-byte value limit, with room to spare).
pub const CHUNK_SIZE: usize = 90_000;
/// Largest blob [`write_in`] accepts and [`write()`] writes in one transaction: well under
/// FDB's 10 MB transaction limit, leaving room for the caller's other writes.
pub const MAX_SINGLE_TXN_BYTES: usize = 8_000_000;
/// Length of an encoded header ([`SCHEMA_VERSION`]).
pub const HEADER_LEN: usize = HEADER_LEN_V1 + 4 + 4;
/// Length of a version 1 header (no CRC-32s).
pub const HEADER_LEN_V1: usize = 1 + 8 + 32 + 4 + 4 + 8;
/// The version of a header without CRC-32s, still read.
const SCHEMA_VERSION_V1: u8 = 1;

/// The length of a header whose first byte (its version) is `version`; `None` for a
/// version this build does not read.
pub fn header_len(version: u8) -> Option<usize> {
    match version {
        SCHEMA_VERSION_V1 => Some(HEADER_LEN_V1),
        SCHEMA_VERSION => Some(HEADER_LEN),
        _ => None,
    }
}
const CHUNKS_PER_TXN: usize = MAX_SINGLE_TXN_BYTES / CHUNK_SIZE;

/// What a blob's header records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    pub len: u64,
    pub sha256: [u8; 32],
    pub chunk_size: u32,
    pub chunk_count: u32,
    /// Random per write; chunks live under `prefix + tuple(generation, i)`.
    pub generation: u64,
    /// CRC-32 (IEEE) of the data; `None` in a version 1 header, read by its SHA-256.
    pub crc32: Option<u32>,
}

impl BlobHeader {
    /// The header a write of `data` under `generation` stores (chunks of
    /// [`CHUNK_SIZE`]).
    pub fn for_data(data: &[u8], generation: u64) -> Self {
        BlobHeader {
            len: data.len() as u64,
            sha256: Sha256::digest(data).into(),
            chunk_size: CHUNK_SIZE as u32,
            chunk_count: data.len().div_ceil(CHUNK_SIZE) as u32,
            generation,
            crc32: Some(crc32fast::hash(data)),
        }
    }

    /// The header's stored bytes: version 2, or version 1 for a header without a
    /// CRC-32 (one read from a version 1 header).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN);
        v.push(if self.crc32.is_some() {
            SCHEMA_VERSION
        } else {
            SCHEMA_VERSION_V1
        });
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.sha256);
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&self.chunk_count.to_le_bytes());
        v.extend_from_slice(&self.generation.to_le_bytes());
        if let Some(crc) = self.crc32 {
            v.extend_from_slice(&crc.to_le_bytes());
            let own = crc32fast::hash(&v);
            v.extend_from_slice(&own.to_le_bytes());
        }
        v
    }

    /// Parse a stored header; [`KvError::Corrupt`] if it is not one this build reads or
    /// its fields are inconsistent.
    pub fn decode(what: &str, b: &[u8]) -> Result<Self, KvError> {
        let corrupt = |reason: String| KvError::Corrupt {
            what: what.to_string(),
            reason,
        };
        let expected_len = match b.first() {
            Some(&v) => {
                header_len(v).ok_or_else(|| corrupt(format!("unknown blob schema version {v}")))?
            }
            None => return Err(corrupt("header is empty".into())),
        };
        if b.len() != expected_len {
            return Err(corrupt(format!(
                "header is {} bytes, expected {expected_len}",
                b.len()
            )));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let crc32 = if expected_len == HEADER_LEN {
            if crc32fast::hash(&b[..HEADER_LEN - 4]) != u32_at(HEADER_LEN - 4) {
                return Err(corrupt("header CRC-32 mismatch".into()));
            }
            Some(u32_at(HEADER_LEN_V1))
        } else {
            None
        };
        let h = BlobHeader {
            len: u64_at(1),
            sha256: b[9..41].try_into().unwrap(),
            chunk_size: u32_at(41),
            chunk_count: u32_at(45),
            generation: u64_at(49),
            crc32,
        };
        let expected = if h.chunk_size == 0 {
            None
        } else {
            Some(h.len.div_ceil(h.chunk_size as u64))
        };
        if h.chunk_size as usize > crate::limits::MAX_VALUE_BYTES
            || expected != Some(h.chunk_count as u64)
        {
            return Err(corrupt(format!(
                "header says {} bytes in {} chunks of {}",
                h.len, h.chunk_count, h.chunk_size
            )));
        }
        Ok(h)
    }

    fn chunk_len(&self, i: u32) -> usize {
        let start = i as u64 * self.chunk_size as u64;
        (self.len - start).min(self.chunk_size as u64) as usize
    }
}

/// The key of chunk `i` of `generation` under `prefix`.
pub fn chunk_key(prefix: &[u8], generation: u64, i: u32) -> Vec<u8> {
    Subspace::from_bytes(prefix).pack(&(generation, i))
}

fn generation_range(prefix: &[u8], generation: u64) -> (Vec<u8>, Vec<u8>) {
    Subspace::from_bytes(prefix)
        .subspace(&(generation,))
        .range()
}

fn describe(prefix: &[u8]) -> String {
    format!("blob {}", hex::encode(prefix))
}

/// Read and parse the header at `prefix` (`None`: no blob).
pub fn header_in(tx: &mut Transaction<'_>, prefix: &[u8]) -> Result<Option<BlobHeader>, KvError> {
    match tx.get(prefix)? {
        None => Ok(None),
        Some(b) => BlobHeader::decode(&describe(prefix), &b).map(Some),
    }
}

/// Remove the header `old` (if any) and the chunks it points at; on an unreadable
/// header remove everything under `prefix`.
fn clear_old(tx: &mut Transaction<'_>, prefix: &[u8], keep: Option<u64>) -> Result<(), KvError> {
    match header_in(tx, prefix) {
        Ok(Some(old)) if Some(old.generation) != keep => {
            let (b, e) = generation_range(prefix, old.generation);
            tx.clear_range(&b, &e)
        }
        Ok(_) => Ok(()),
        Err(KvError::Corrupt { .. }) => tx.clear_prefix(prefix),
        Err(e) => Err(e),
    }
}

/// Write `data` as the blob at `prefix` inside the caller's transaction, replacing any
/// blob there; commits (or not) with the rest of the transaction. At most
/// [`MAX_SINGLE_TXN_BYTES`] (else [`KvError::InvalidArgument`]: use [`write()`]).
pub fn write_in(
    tx: &mut Transaction<'_>,
    prefix: &[u8],
    data: &[u8],
) -> Result<BlobHeader, KvError> {
    if data.len() > MAX_SINGLE_TXN_BYTES {
        return Err(KvError::InvalidArgument(format!(
            "{}: {} bytes do not fit in one transaction (at most {MAX_SINGLE_TXN_BYTES}); use blob::write",
            describe(prefix),
            data.len()
        )));
    }
    clear_old(tx, prefix, None)?;
    let header = BlobHeader::for_data(data, rand::random());
    for (i, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
        tx.set(&chunk_key(prefix, header.generation, i as u32), chunk)?;
    }
    tx.set(prefix, &header.encode())?;
    Ok(header)
}

/// Write `data` as the blob at `prefix`, replacing any blob there. Up to
/// [`MAX_SINGLE_TXN_BYTES`] this is one transaction; larger blobs are written in several
/// (chunks first, header last), so readers see the old blob until the new one is whole.
/// If it fails part-way, the old blob is still there and readable.
pub fn write(db: &Db, prefix: &[u8], data: &[u8]) -> Result<BlobHeader, KvError> {
    if data.len() <= MAX_SINGLE_TXN_BYTES {
        return db.transact(|tx| write_in(tx, prefix, data));
    }
    if data.len().div_ceil(CHUNK_SIZE) > u32::MAX as usize {
        return Err(KvError::InvalidArgument(format!(
            "{}: {} bytes is too large for a blob",
            describe(prefix),
            data.len()
        )));
    }
    let header = BlobHeader::for_data(data, rand::random());
    let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE).collect();
    let result = (|| {
        for (batch_no, batch) in chunks.chunks(CHUNKS_PER_TXN).enumerate() {
            let first = batch_no * CHUNKS_PER_TXN;
            // Idempotent: the same keys and values on every attempt.
            db.transact(|tx| {
                for (j, chunk) in batch.iter().enumerate() {
                    tx.set(
                        &chunk_key(prefix, header.generation, (first + j) as u32),
                        chunk,
                    )?;
                }
                Ok(())
            })?;
        }
        db.transact(|tx| {
            clear_old(tx, prefix, Some(header.generation))?;
            tx.set(prefix, &header.encode())
        })
    })();
    if let Err(e) = result {
        // Best effort: remove this write's chunks unless its header made it.
        let (b, end) = generation_range(prefix, header.generation);
        let _ = db.transact(|tx| match header_in(tx, prefix) {
            Ok(Some(h)) if h.generation == header.generation => Ok(()),
            _ => tx.clear_range(&b, &end),
        });
        return Err(e);
    }
    Ok(header)
}

/// Check `chunks` (rows of one generation, in order, starting at chunk `first`) and
/// append them to `out`. Returns the number of chunks taken, or the index of the first
/// missing chunk.
fn take_chunks(
    prefix: &[u8],
    h: &BlobHeader,
    first: u32,
    rows: &[(Vec<u8>, Vec<u8>)],
    out: &mut Vec<u8>,
) -> Result<Result<u32, u32>, KvError> {
    let mut i = first;
    for (k, v) in rows {
        if i >= h.chunk_count || *k != chunk_key(prefix, h.generation, i) {
            // A key that is not the next chunk: chunk `i` is missing (or stray data).
            return Ok(Err(i));
        }
        if v.len() != h.chunk_len(i) {
            return Err(KvError::Corrupt {
                what: format!("{} chunk {i}", describe(prefix)),
                reason: format!("{} bytes, expected {}", v.len(), h.chunk_len(i)),
            });
        }
        out.extend_from_slice(v);
        i += 1;
    }
    Ok(Ok(i - first))
}

fn verify(prefix: &[u8], h: &BlobHeader, data: &[u8]) -> Result<(), KvError> {
    if data.len() as u64 != h.len {
        return Err(KvError::Corrupt {
            what: describe(prefix),
            reason: format!("{} bytes, header says {}", data.len(), h.len),
        });
    }
    let (intact, what) = match h.crc32 {
        Some(crc) => (crc32fast::hash(data) == crc, "CRC-32"),
        None => (
            <[u8; 32]>::from(Sha256::digest(data)) == h.sha256,
            "SHA-256",
        ),
    };
    if !intact {
        return Err(KvError::Corrupt {
            what: describe(prefix),
            reason: format!("{what} mismatch"),
        });
    }
    Ok(())
}

fn missing(prefix: &[u8], i: u32) -> KvError {
    KvError::Corrupt {
        what: format!("{} chunk {i}", describe(prefix)),
        reason: "missing".into(),
    }
}

/// Read the blob at `prefix` inside the caller's transaction: `Ok(None)` when absent,
/// [`KvError::Corrupt`] when a chunk is missing or the length or hash is wrong. Reads
/// the whole blob in one transaction, so keep it for blobs that read well within
/// [`crate::limits::MAX_TXN_AGE`]; [`read`] handles any size.
pub fn read_in(tx: &mut Transaction<'_>, prefix: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
    Ok(read_in_with_header(tx, prefix)?.map(|(data, _)| data))
}

/// [`read_in`], with the blob's header: its `sha256` is the written data's digest
/// (checked by the header's CRC-32, the data by its own), so a caller that needs the
/// digest need not hash the data again.
pub fn read_in_with_header(
    tx: &mut Transaction<'_>,
    prefix: &[u8],
) -> Result<Option<(Vec<u8>, BlobHeader)>, KvError> {
    let Some(h) = header_in(tx, prefix)? else {
        return Ok(None);
    };
    let (b, e) = generation_range(prefix, h.generation);
    let rows = tx.get_range(&RangeOption::new(b, e).limit(h.chunk_count as usize + 1))?;
    // Sized by what is stored, not by what the header claims: a corrupt header may
    // claim more than any allocator has.
    let mut out = Vec::with_capacity(rows.iter().map(|(_, v)| v.len()).sum());
    match take_chunks(prefix, &h, 0, &rows, &mut out)? {
        Ok(n) if n == h.chunk_count => {}
        Ok(n) | Err(n) => return Err(missing(prefix, n)),
    }
    verify(prefix, &h, &out)?;
    Ok(Some((out, h)))
}

/// Read the blob at `prefix`: `Ok(None)` when absent, [`KvError::Corrupt`] when a chunk
/// is missing or the length or hash is wrong. Large blobs are read over several
/// transactions (about [`MAX_SINGLE_TXN_BYTES`] each); if the blob is replaced meanwhile,
/// the read starts over on the new one (a few times, then [`KvError::Transient`]).
pub fn read(db: &Db, prefix: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
    for _ in 0..5 {
        let Some(h) = db.transact(|tx| header_in(tx, prefix))? else {
            return Ok(None);
        };
        if h.len as usize <= MAX_SINGLE_TXN_BYTES {
            return db.transact(|tx| read_in(tx, prefix));
        }
        // Grows as chunks arrive: the header's length is checked only at the end.
        let mut out = Vec::with_capacity(MAX_SINGLE_TXN_BYTES);
        let mut next = 0u32;
        let mut replaced = false;
        while next < h.chunk_count {
            let (_, end) = generation_range(prefix, h.generation);
            let begin = chunk_key(prefix, h.generation, next);
            let rows = db.transact(|tx| {
                tx.get_range(&RangeOption::new(begin.clone(), end.clone()).limit(CHUNKS_PER_TXN))
            })?;
            let before = out.len();
            let taken = take_chunks(prefix, &h, next, &rows, &mut out)?;
            match taken {
                Ok(n) if n > 0 => next += n,
                Ok(_) | Err(_) => {
                    out.truncate(before);
                    // Missing chunk: replaced or deleted meanwhile, or corrupt.
                    let missing_at = match taken {
                        Ok(_) => next,
                        Err(i) => i,
                    };
                    match db.transact(|tx| header_in(tx, prefix))? {
                        None => return Ok(None),
                        Some(now) if now.generation != h.generation => {
                            replaced = true;
                            break;
                        }
                        Some(_) => return Err(missing(prefix, missing_at)),
                    }
                }
            }
        }
        if replaced {
            continue;
        }
        verify(prefix, &h, &out)?;
        return Ok(Some(out));
    }
    Err(KvError::Transient(format!(
        "{} kept being replaced while it was read",
        describe(prefix)
    )))
}

/// Delete the blob at `prefix` (header, chunks of every generation) in the caller's
/// transaction. No error when absent.
pub fn delete_in(tx: &mut Transaction<'_>, prefix: &[u8]) -> Result<(), KvError> {
    tx.clear_prefix(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_nonsense() {
        let h = BlobHeader::for_data(&vec![7u8; CHUNK_SIZE * 2 + 1], 42);
        assert_eq!(h.chunk_count, 3);
        let b = h.encode();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(BlobHeader::decode("t", &b).unwrap(), h);
        // A version 1 header (no CRC-32s) still reads, and encodes as it was.
        let v1 = BlobHeader {
            crc32: None,
            ..h.clone()
        };
        let b1 = v1.encode();
        assert_eq!((b1.len(), b1[0]), (HEADER_LEN_V1, 1));
        assert_eq!(BlobHeader::decode("t", &b1).unwrap(), v1);
        // Any damage to a version 2 header, its digest included, is caught.
        for i in [9, 20, 49, HEADER_LEN_V1, HEADER_LEN - 1] {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(BlobHeader::decode("t", &bad), Err(KvError::Corrupt { .. })),
                "byte {i}"
            );
        }
        let mut bad = b.clone();
        bad[0] = 9;
        assert!(matches!(
            BlobHeader::decode("t", &bad),
            Err(KvError::Corrupt { .. })
        ));
        let mut bad = b.clone();
        bad[45] = 7; // chunk count disagrees with length
        assert!(BlobHeader::decode("t", &bad).is_err());
        assert!(BlobHeader::decode("t", &b[..10]).is_err());
        assert_eq!(BlobHeader::for_data(&[], 1).chunk_count, 0);
    }

    /// A corrupt header that is consistent with itself may claim ~430 TB: reading it
    /// reports the blob corrupt, and never asks the allocator for what the header
    /// claims (that aborted the process).
    #[test]
    fn a_header_claiming_an_impossible_size_reads_as_corrupt() {
        let db = Db::new(crate::embedded::EmbeddedBackend::open_temp().unwrap());
        let prefix = b"huge";
        let h = BlobHeader {
            len: u32::MAX as u64 * 100_000,
            sha256: [0; 32],
            chunk_size: 100_000,
            chunk_count: u32::MAX,
            generation: 5,
            crc32: Some(0),
        };
        let header = h.encode();
        assert_eq!(BlobHeader::decode("t", &header).unwrap(), h);
        db.transact(|tx| {
            tx.set(prefix, &header)?;
            tx.set(&chunk_key(prefix, 5, 0), &[1; 100_000])?;
            tx.set(&chunk_key(prefix, 5, 1), &[2; 10])
        })
        .unwrap();
        let e = db.transact(|tx| read_in(tx, prefix)).unwrap_err();
        assert!(matches!(e, KvError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("chunk 1"), "{e}");
        let e = read(&db, prefix).unwrap_err();
        assert!(matches!(e, KvError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn chunk_keys_sort_by_index_under_their_generation() {
        let p = b"p";
        assert!(chunk_key(p, 1, 9) < chunk_key(p, 1, 10));
        let (b, e) = generation_range(p, 1);
        let k = chunk_key(p, 1, 300);
        assert!(b <= k && k < e);
        assert!(!(b <= chunk_key(p, 2, 0) && chunk_key(p, 2, 0) < e));
        assert!(k.starts_with(p) && k.len() > p.len());
    }
}

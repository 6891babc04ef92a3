//! The byte formats the bus keeps in the store: records of the embedded log and
//! entries of the Kafka bus's outbox. Pure functions, outside the `kafka` feature so
//! every build (and the fuzzer, `fuzz/fuzz_targets/bus_records.rs`) has them.
//!
//! Decoding never panics: any bytes give a record or an error naming what is wrong.

const LOG_RECORD_VERSION: u8 = 1;
const OUTBOX_VERSION: u8 = 1;

/// One embedded-log record: `[version u8][key_len u16 LE][key][payload]`.
pub fn encode_log_record(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + key.len() + payload.len());
    v.push(LOG_RECORD_VERSION);
    v.extend_from_slice(&(key.len() as u16).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// The key and payload of an [`encode_log_record`] value.
pub fn decode_log_record(bytes: &[u8]) -> Result<(String, Vec<u8>), String> {
    if bytes.len() < 3 {
        return Err("record truncated".into());
    }
    if bytes[0] != LOG_RECORD_VERSION {
        return Err(format!("record version {}", bytes[0]));
    }
    let n = u16::from_le_bytes([bytes[1], bytes[2]]) as usize;
    let key = bytes.get(3..3 + n).ok_or("record key truncated")?;
    let key = std::str::from_utf8(key).map_err(|_| "record key not UTF-8")?;
    Ok((key.to_string(), bytes[3 + n..].to_vec()))
}

/// An event waiting in the Kafka bus's outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
}

/// One outbox entry: `[version u8][topic_len u16 LE][topic][key_len u16 LE][key][payload]`.
pub fn encode_outbox_entry(topic: &str, key: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + topic.len() + key.len() + payload.len());
    v.push(OUTBOX_VERSION);
    v.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(&(key.len() as u16).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// Parse an [`encode_outbox_entry`] value.
pub fn decode_outbox_entry(b: &[u8]) -> Result<OutboxEntry, String> {
    fn take<'a>(b: &'a [u8], at: &mut usize) -> Result<&'a str, String> {
        let n = b
            .get(*at..*at + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
            .ok_or("outbox entry truncated")?;
        let s = b
            .get(*at + 2..*at + 2 + n)
            .ok_or("outbox entry truncated")?;
        *at += 2 + n;
        std::str::from_utf8(s).map_err(|_| "outbox entry not UTF-8".to_string())
    }
    match b.first() {
        Some(&OUTBOX_VERSION) => {}
        Some(v) => return Err(format!("outbox entry version {v}")),
        None => return Err("outbox entry empty".into()),
    }
    let mut at = 1;
    let topic = take(b, &mut at)?.to_string();
    let key = take(b, &mut at)?.to_string();
    Ok(OutboxEntry {
        topic,
        key,
        payload: b[at..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_round_trip_and_every_truncation_is_an_error() {
        let b = encode_log_record("user-1", b"{\"v\":1}");
        assert_eq!(
            decode_log_record(&b).unwrap(),
            ("user-1".to_string(), b"{\"v\":1}".to_vec())
        );
        for n in 0..9 {
            assert!(decode_log_record(&b[..n]).is_err(), "{n}");
        }
        assert!(decode_log_record(&[2, 0, 0]).is_err());
        assert!(decode_log_record(&[1, 1, 0, 0xff]).is_err());
    }

    #[test]
    fn outbox_entries_round_trip_and_bad_bytes_are_errors() {
        let b = encode_outbox_entry("swimlane.batches", "user-1", b"{\"x\":1}");
        assert_eq!(
            decode_outbox_entry(&b).unwrap(),
            OutboxEntry {
                topic: "swimlane.batches".into(),
                key: "user-1".into(),
                payload: b"{\"x\":1}".to_vec(),
            }
        );
        for n in 0..27 {
            assert!(decode_outbox_entry(&b[..n]).is_err(), "{n}");
        }
        assert!(decode_outbox_entry(&[9, 0, 0]).is_err());
        assert!(decode_outbox_entry(&[1, 0xff, 0xff]).is_err());
    }
}

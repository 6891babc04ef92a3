//! A deterministic safetensors writer: the header (metadata and tensor entries) is
//! written in sorted key order, so the same model always gives the same bytes (the
//! `safetensors` crate writes metadata in hash-map order). Reading uses the
//! `safetensors` crate.
use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One tensor to write: name, dtype name (`F32`, `U8`), shape, little-endian bytes.
pub(crate) struct Entry<'a> {
    pub name: &'a str,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Serialise `entries` (in the given order) with `metadata` as `__metadata__`.
pub(crate) fn write(entries: &[Entry<'_>], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header: BTreeMap<String, Value> = BTreeMap::new();
    header.insert("__metadata__".into(), json!(metadata));
    let mut offset = 0usize;
    for e in entries {
        header.insert(
            e.name.to_string(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.data.len()]}),
        );
        offset += e.data.len();
    }
    let mut h = serde_json::to_vec(&header).expect("a json map serialises");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for e in entries {
        out.extend_from_slice(e.data);
    }
    out
}

//! Reading a blob whose stored header and chunks are arbitrary bytes, from a real
//! embedded store (`swimlane_store::blob::read_in` and `read`). The input is the header
//! value (as many bytes as `blob::header_len` gives for its first byte, else `HEADER_LEN`) and chunk data: the rest, cut into chunks of the
//! header's chunk size when the header decodes (at most 8), stored under its generation.
//!
//! Checks: never a panic, never an allocation the stored data does not justify; what
//! reads back has the header's length and checksum (CRC-32; SHA-256 in a version 1
//! header).
#![no_main]
include!("../checks/blob_read.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));

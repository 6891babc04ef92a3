//! swimlane-ingest worker library (filled in by the pipeline issue).

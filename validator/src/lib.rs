//! swimlane-validator worker library (filled in by the pipeline issue).

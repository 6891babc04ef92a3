//! swimlane-publisher worker library (filled in by the pipeline issue).

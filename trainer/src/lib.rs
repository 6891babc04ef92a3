//! swimlane-trainer worker library (filled in by the pipeline issue).

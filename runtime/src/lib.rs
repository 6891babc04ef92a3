//! swimlane-runtime (filled in by later issues).

//! swimlane-model (filled in by later issues).

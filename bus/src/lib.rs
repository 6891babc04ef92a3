//! swimlane-bus (filled in by later issues).

//! The bus conformance suite (`swimlane_bus::conformance`) against the embedded log.
swimlane_bus::bus_conformance_tests!(swimlane_bus::conformance::TempEmbeddedBus::new());

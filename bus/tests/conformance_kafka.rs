//! The bus conformance suite (`swimlane_bus::conformance`) against Kafka: the broker
//! named by `SWIMLANE_TEST_KAFKA` (tansu in `.ci/run`); skipped when it is unset.
#![cfg(feature = "kafka")]
swimlane_bus::bus_conformance_tests!(swimlane_bus::conformance::KafkaBusUnderTest::from_env());

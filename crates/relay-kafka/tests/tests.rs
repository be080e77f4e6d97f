//! The Kafka sink against rdkafka's in-process mock cluster (real Kafka
//! protocol, in-process brokers): no Kafka broker runs on these machines.

mod kafka;

"""tidegate bridge: the cloud side (Kafka producer, routing, forwarding, TLS)."""

"""tidegate edge: the device side (embedded MQTT broker, ingest, SQLite buffer, registry)."""

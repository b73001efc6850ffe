"""tidegate device_sim: simulated device fleets and the verifier oracle that reads Kafka back."""

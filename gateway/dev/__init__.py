"""Development tooling: the project's local Apache Kafka and its CLI.

Not used by the gateway at run time; tests, CI and the demo start Kafka through
:mod:`gateway.dev.kafka`.
"""

"""tidegate gateway: configuration, CLI, lifecycle, and the glue between edge and bridge."""

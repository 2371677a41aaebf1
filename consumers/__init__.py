"""Kafka consumers and background sweepers."""

"""segstream: real-time streaming customer segmentation on Kafka and Redis."""

__version__ = "0.1.0"

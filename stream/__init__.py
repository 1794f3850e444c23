"""segstream: real-time streaming customer segmentation on Kafka and Redis."""

__version__ = "0.1.0"

from stream.native import install as _install_native

_install_native()  # compiled hot-path modules, where built from the current source

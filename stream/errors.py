"""The engine's exception hierarchy. Third-party errors are translated at the adapters."""

from __future__ import annotations


class SegstreamError(Exception):
    """Base class of every error the engine raises on purpose."""


class SettingsError(SegstreamError):
    """A setting is missing or invalid; the message names the environment variable."""


class ServiceError(SegstreamError):
    """A local service (Kafka, Redis) could not be installed, started or reached."""


class StoreError(SegstreamError):
    """The state store failed; the operation may or may not have been applied."""


class CommitConflict(StoreError):
    """Another writer committed to the partition since the batch was loaded."""


class PipelineFailed(SegstreamError):
    """A batch gave up (its commit was fenced again and again), or one committing in the
    background gave up or was cancelled before it landed (see
    :meth:`stream.pipeline.BatchProcessor.process`): nothing after it may be committed, so
    the worker stops, and restarted it resumes from the store's watermarks. Its message
    carries no customer data (logs keep it: an underlying error is described with
    :func:`stream.redact.describe`)."""


class PublishRefused(SegstreamError):
    """An output topic refused records of the outbox (they wait there for the next flush);
    the message names the topic and the setting or topic limit to change, and carries no
    customer data."""

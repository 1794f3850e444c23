"""The Faust floor: a trivial agent that only counts the input records.

Run as ``python -m bench.floor`` with the deployment's ``SEGSTREAM_*`` settings (its
own app id), ``BENCH_EXPECT`` (records to wait for) and ``BENCH_OUT`` (a JSON file,
written at the first batch and once the expected records arrived).
The app is configured as the engine's (the same app class, event loop and garbage
collector settings, raw bytes, one agent, ``concurrency=1``, the same batching
(:func:`stream.batching.take_batches`) and commit settings), so the difference
between this and the engine is the engine's own work. The file holds
``{"count", "first_batch", "t_first", "t_last"}`` (wall-clock seconds at the first and
the last batch); the process keeps running until it is stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import faust
import orjson

from stream.app import LeanApp, _broker_credentials, stream_buffering, tune_gc, use_event_loop
from stream.batching import Drained, kafka_backlog, take_batches
from stream.settings import Settings, load_settings


def create_app(settings: Settings, expect: int, out: Path) -> faust.App:
    """A Faust app whose one agent counts records the way the engine batches them."""
    app = LeanApp(
        settings.app_id,
        broker=settings.kafka_url,
        broker_credentials=_broker_credentials(settings),
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        store="memory://",
        datadir=str(settings.data_dir / "faust" / settings.app_id),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_wait_empty=False,
        **stream_buffering(settings),
        broker_commit_every=settings.batch_max,
        broker_commit_interval=1.0,
        logging_config=None,
    )
    source = app.topic(*settings.input_topics, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions)
    seen = {"count": 0, "first_batch": 0, "t_first": 0.0, "t_last": 0.0}

    async def count(stream: Any) -> Any:
        drained = Drained(stream, lambda: kafka_backlog(app, settings.input_topics))
        async for events in take_batches(stream, settings.batch_max, settings.batch_within_s,
                                         drained):
            now = time.time()
            first = seen["count"] == 0
            if first:
                seen["first_batch"], seen["t_first"] = len(events), now
            seen["count"] += len(events)
            seen["t_last"] = now
            if first or seen["count"] >= expect:
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(orjson.dumps(seen))
                tmp.replace(out)
            yield len(events)

    app.agent(source, name="count", concurrency=1)(count)
    return app


def main() -> None:
    from faust.worker import Worker

    settings = load_settings()
    use_event_loop(settings)
    out = Path(os.environ["BENCH_OUT"])
    app = create_app(settings, int(os.environ["BENCH_EXPECT"]), out)
    worker = Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    tune_gc(settings)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()

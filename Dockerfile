# The segstream worker image. Built by docker-compose.yml (service `worker`).

# The compiled hot-path modules (stream/native.py) need a C compiler; only their build does.
FROM python:3.11-slim AS native
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN pip install --no-cache-dir -c /src/constraints.txt /src \
    && SEGSTREAM_NATIVE_DIR=/opt/segstream/native segstream native build

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEGSTREAM_WEB_HOST=0.0.0.0 \
    SEGSTREAM_WEB_PORT=6066

RUN groupadd --system --gid 10001 segstream \
    && useradd --system --uid 10001 --gid segstream --create-home \
       --home-dir /home/segstream --shell /usr/sbin/nologin segstream

# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed; both
# stages install the versions of constraints.txt. The
# compiled modules were built from these same sources (each is loaded only while its source
# has the hash it was built from).
COPY . /src
RUN pip install --no-cache-dir -c /src/constraints.txt /src && rm -rf /src
COPY --from=native /opt/segstream/native /opt/segstream/native
ENV SEGSTREAM_NATIVE_DIR=/opt/segstream/native

# The worker's working directory; its data goes to SEGSTREAM_DATA_DIR (by default
# ~/.cache/segstream, in the home directory created above).
WORKDIR /app
RUN chown segstream:segstream /app

USER 10001:10001

EXPOSE 6066
CMD ["segstream", "worker"]

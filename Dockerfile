# The one image of both services (receivers and worker). Not built on the CI machines here (no Docker engine).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ocpi ocpi
COPY infra infra
COPY receivers receivers
COPY pipeline pipeline
COPY avro avro
RUN pip install --no-cache-dir .
# OCPI_DATA_DIR in docker-compose.yml: a named volume mounted here starts as a copy of this directory, ownership
# included, so the unprivileged user can write its state and keys (otherwise Docker creates it owned by root).
RUN mkdir -p /var/lib/ocpi && chown nobody /var/lib/ocpi
USER nobody
ENTRYPOINT ["ocpi-pipeline"]

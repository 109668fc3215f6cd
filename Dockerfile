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
USER nobody
ENTRYPOINT ["ocpi-pipeline"]

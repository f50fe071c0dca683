# One image for every scanwatch Python service; docker-compose.yml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY requirements.lock .
RUN uv pip sync --system --no-cache requirements.lock
COPY pyproject.toml README.md ./
COPY scanwatch scanwatch
COPY schemas schemas
COPY dicom_listener dicom_listener
COPY inference_worker inference_worker
COPY services services
COPY training training
RUN uv pip install --system --no-cache --no-deps .
RUN useradd --system --uid 10001 scanwatch && mkdir -p /data && chown scanwatch /data
USER scanwatch

# One image per scanwatch service, each with only its own code and dependencies (the service's
# extra in pyproject.toml, at the versions requirements.lock pins):
#   docker build --target listener -t scanwatch-listener .
# Targets: listener, worker, fhir-api, model-server, training, chatbot, portal, console.
# docker-compose.yml builds them.
#
# Every image runs as the unprivileged user scanwatch (uid and gid 10001, no home, no shell), set
# by number so that a runtime can check it is not root (Kubernetes runAsNonRoot). The root
# filesystem is meant to be mounted read-only (docker-compose.yml: read_only, a tmpfs on /tmp):
# each stage creates the folders its service writes under /data, owned by 10001, and compose
# mounts a volume there (a new named volume takes the folder's owner and mode). SECURITY.md.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
RUN pip install --no-cache-dir uv \
    && groupadd --system --gid 10001 scanwatch \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin scanwatch \
    && install -d -o 10001 -g 10001 /data
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
# The shared runtime kernel and the event contracts: every service imports them.
COPY scanwatch scanwatch
COPY schemas schemas

FROM base AS listener
COPY dicom_listener dicom_listener
RUN uv pip install --system --no-cache -c requirements.lock ".[listener]" \
    && install -d -o 10001 -g 10001 /data/store
# /data/store: the file store's volume (instances, the outbox, the quarantine).
USER 10001:10001
CMD ["scanwatch-listener"]

FROM base AS worker
COPY inference_worker inference_worker
RUN uv pip install --system --no-cache -c requirements.lock ".[worker]" \
    && install -d -o 10001 -g 10001 /data/worker /data/store
# /data/worker: Faust's tables; /data/store: the listener's store, where it adds heatmap series.
USER 10001:10001
CMD ["scanwatch-worker"]

FROM base AS fhir-api
COPY services/__init__.py services/__init__.py
COPY services/auth services/auth
COPY services/fhir_api services/fhir_api
RUN uv pip install --system --no-cache -c requirements.lock ".[fhir-api]" \
    && install -d -m 700 -o 10001 -g 10001 /data/auth
# /data/auth: the token signing keys' volume (compose); a new volume takes this owner and mode.
USER 10001:10001
CMD ["scanwatch-fhir-api"]

FROM base AS model-server
COPY services/__init__.py services/__init__.py
COPY services/model_server services/model_server
RUN uv pip install --system --no-cache -c requirements.lock ".[model-server]" \
    && install -d -o 10001 -g 10001 /data/model-server
# /data/model-server: OpenVINO's compiled-model cache (SCANWATCH_MODEL_SERVER_OPENVINO_CACHE_DIR).
ENV SCANWATCH_MODEL_SERVER_OPENVINO_CACHE_DIR=/data/model-server/openvino
USER 10001:10001
CMD ["scanwatch-model-server"]

# The patient portal: its front-end packages come from npm in a Node stage (package-lock.json;
# only the ones it serves: no devDependencies), the Python side is the portal extra. It reads
# tokens with services.auth's plain verifier modules only.
FROM node:20-slim AS portal-assets
WORKDIR /assets
COPY services/portal/package.json services/portal/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

# What a web app of the auth server's needs of services/auth (the portal and the console): token
# verification from the JWKS, the OAuth web client, the server-side session, the security
# headers; never the authorization server, its accounts or its client registry.
FROM base AS web-base
COPY services/__init__.py services/__init__.py
COPY services/auth/__init__.py services/auth/scopes.py services/auth/tokens.py \
     services/auth/jwks.py services/auth/config.py services/auth/web_client.py \
     services/auth/web_sessions.py services/auth/web_security.py services/auth/

FROM web-base AS portal
COPY services/portal services/portal
COPY --from=portal-assets /assets/node_modules services/portal/node_modules
RUN uv pip install --system --no-cache -c requirements.lock ".[portal]"
# The portal writes nothing (sessions are in memory): a read-only root and a tmpfs /tmp.
USER 10001:10001
CMD ["scanwatch-portal"]

# The staff console: its pages (the worklist, the viewer, review, operator pages) and DICOMweb
# over the listener's store. It runs no training code: it reads the model registry (in the
# kernel) and talks to the training worker over Kafka.
FROM web-base AS console
COPY services/console services/console
RUN uv pip install --system --no-cache -c requirements.lock ".[console]" \
    && install -d -o 10001 -g 10001 /data/console
# /data/console: the DICOM index and the audit log (its volume); the store is mounted read-only.
USER 10001:10001
CMD ["scanwatch-console"]

FROM base AS training
COPY training training
RUN uv pip install --system --no-cache -c requirements.lock ".[training]" \
    && install -d -o 10001 -g 10001 /data/training /models
# /data/training: run folders and the dataset cache; /models: the model repository it publishes
# into (a bind mount in compose: the host folder must be writable by uid 10001).
USER 10001:10001
CMD ["scanwatch-train", "worker"]

# The patient chatbot: Rasa 3.6.21 and its action server, on the pins of chatbot/requirements.lock
# (older numpy/TensorFlow than the rest: DESIGN §4; matplotlib 3.5 builds from source on 3.11).
# Only the plain modules of scanwatch and services.auth it imports are copied. The model is
# trained at build time (chatbot/train.py), so the image starts without training.
FROM python:3.11-slim AS chatbot
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 RASA_TELEMETRY_ENABLED=false \
    PYTHONPATH=/app:/app/chatbot
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config \
       libfreetype-dev libpng-dev libqhull-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 scanwatch \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin scanwatch
# Matplotlib (imported by Rasa) writes its cache under $MPLCONFIGDIR: the tmpfs /tmp, since the
# root filesystem is read-only and the user has no home.
ENV MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /app
COPY chatbot/requirements.lock chatbot/mpl-setup.cfg chatbot/
RUN MPLSETUPCFG=/app/chatbot/mpl-setup.cfg pip install --no-cache-dir --no-deps \
    --ignore-requires-python -r chatbot/requirements.lock
COPY scanwatch/__init__.py scanwatch/fhir_codes.py scanwatch/care_plan.py scanwatch/ids.py \
     scanwatch/durable.py scanwatch/patient_records.py scanwatch/
COPY services/__init__.py services/__init__.py
COPY services/auth/__init__.py services/auth/scopes.py services/auth/tokens.py \
     services/auth/jwks.py services/auth/
COPY chatbot chatbot
RUN python chatbot/train.py --out /app/models
WORKDIR /app/chatbot
USER 10001:10001
CMD ["rasa", "run", "--enable-api", "-i", "127.0.0.1", "--credentials", "credentials.yml", \
     "--endpoints", "endpoints.yml", "--model", "/app/models"]

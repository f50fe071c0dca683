# One image per scanwatch service, each with only its own code and dependencies (the service's
# extra in pyproject.toml, at the versions requirements.lock pins):
#   docker build --target listener -t scanwatch-listener .
# Targets: listener, worker, fhir-api, model-server, training, chatbot, portal, console.
# docker-compose.yml builds them.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
RUN pip install --no-cache-dir uv \
    && useradd --system --uid 10001 scanwatch && mkdir -p /data && chown scanwatch /data
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
# The shared runtime kernel and the event contracts: every service imports them.
COPY scanwatch scanwatch
COPY schemas schemas

FROM base AS listener
COPY dicom_listener dicom_listener
RUN uv pip install --system --no-cache -c requirements.lock ".[listener]"
USER scanwatch
CMD ["scanwatch-listener"]

FROM base AS worker
COPY inference_worker inference_worker
RUN uv pip install --system --no-cache -c requirements.lock ".[worker]"
USER scanwatch
CMD ["scanwatch-worker"]

FROM base AS fhir-api
COPY services/__init__.py services/__init__.py
COPY services/auth services/auth
COPY services/fhir_api services/fhir_api
RUN uv pip install --system --no-cache -c requirements.lock ".[fhir-api]" \
    && install -d -m 700 -o scanwatch /data/auth
# /data/auth: the token signing keys' volume (compose); a new volume takes this owner and mode.
USER scanwatch
CMD ["scanwatch-fhir-api"]

FROM base AS model-server
COPY services/__init__.py services/__init__.py
COPY services/model_server services/model_server
RUN uv pip install --system --no-cache -c requirements.lock ".[model-server]"
USER scanwatch
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
USER scanwatch
CMD ["scanwatch-portal"]

# The staff console: its pages (the worklist, the viewer, review, operator pages) and DICOMweb
# over the listener's store. It runs no training code: it reads the model registry (in the
# kernel) and talks to the training worker over Kafka.
FROM web-base AS console
COPY services/console services/console
RUN uv pip install --system --no-cache -c requirements.lock ".[console]"
USER scanwatch
CMD ["scanwatch-console"]

FROM base AS training
COPY training training
RUN uv pip install --system --no-cache -c requirements.lock ".[training]"
USER scanwatch
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
    && useradd --system --uid 10001 scanwatch
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
USER scanwatch
CMD ["rasa", "run", "--enable-api", "-i", "127.0.0.1", "--credentials", "credentials.yml", \
     "--endpoints", "endpoints.yml", "--model", "/app/models"]

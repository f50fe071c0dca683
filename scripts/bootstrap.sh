#!/usr/bin/env bash
# Installs everything scanwatch needs on a fresh machine, and nothing that is already there:
# Debian packages, the Python environment (.venv, from requirements.lock), Kafka's jars
# (Maven Central, java/kafka/pom.xml), the default model, the chatbot's own environment
# (.venv-rasa, from chatbot/requirements.lock) and its trained model. Safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VAR=${SCANWATCH_VAR:-$ROOT/var}
# What this machine built once and any clone may reuse, like pip's and npm's caches: the chatbot's
# trained models, by the hash of their inputs.
CACHE=${SCANWATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scanwatch}
mkdir -p "$VAR"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------------------------
# dcmtk: real DICOM peers (storescu/echoscu) for the tests and the sample sender.
# orthanc: a real PACS, the listener's peer in tests and in the ingest benchmark.
# openssl: test certificates for DICOM TLS.
# postgresql: the FHIR store's production database; the tests start throwaway clusters with its
# initdb/pg_ctl (no system cluster is started).
# libfreetype-dev libpng-dev libqhull-dev pkg-config: matplotlib 3.5 (a Rasa dependency) builds
# from source on Python 3.11 against them (DESIGN §4).
# chromium: the browser the portal's tests drive with Playwright (a browser download by the test
# tool fails here; DESIGN §4).
# openjdk-17-jdk-headless: Kafka's JVM, and jcmd, with which the soak and its test force the
# broker's full collections.
APT_PACKAGES=(dcmtk orthanc openssl postgresql openjdk-17-jdk-headless maven npm
  libfreetype-dev libpng-dev libqhull-dev pkg-config chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# A JDK from elsewhere (the machine's own) is as good as Debian's.
if command -v jcmd >/dev/null; then missing=("${missing[@]/openjdk-17-jdk-headless}"); fi
if command -v mvn >/dev/null; then missing=("${missing[@]/maven}"); fi
if command -v npm >/dev/null; then missing=("${missing[@]/npm}"); fi
read -r -a missing <<<"${missing[*]:-}"
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python environment ----------------------------------------------------------------------
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
  log "installing uv"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check uv
fi
UV=("$PYTHON" -m uv)
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "${UV[@]}" venv --quiet --python "$PYTHON" .venv
fi
lock_hash=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.scanwatch-lock 2>/dev/null)" != "$lock_hash" ]; then
  log "syncing .venv with requirements.lock"
  "${UV[@]}" pip sync --quiet --python .venv/bin/python requirements.lock
  "${UV[@]}" pip install --quiet --python .venv/bin/python --no-deps -e .
  echo "$lock_hash" > .venv/.scanwatch-lock
fi

# --- The portal's front-end packages (npm) ---------------------------------------------------
# chart.js (the progress chart) and axe-core (the browser tests' accessibility checks), from the
# npm registry into services/portal/node_modules, served by the portal itself (pages never load
# from a CDN). Installed again only when the lock file changes.
portal_lock_hash=$(sha256sum services/portal/package-lock.json | cut -d' ' -f1)
if [ "$(cat services/portal/node_modules/.scanwatch-lock 2>/dev/null)" != "$portal_lock_hash" ]; then
  log "installing the portal's front-end packages (npm ci)"
  (cd services/portal && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$portal_lock_hash" > services/portal/node_modules/.scanwatch-lock
fi

# --- Java jars from Maven Central -------------------------------------------------------------
# java/<name>/pom.xml -> $VAR/<name>/libs, fetched again only when the pom changes.
#   kafka:          the broker run by devtools/kafka_local.py
#   fhir-validator: HAPI FHIR's instance validator, run offline by the FHIR API's tests
for name in kafka fhir-validator; do
  libs=$VAR/$name/libs
  pom_hash=$(sha256sum "java/$name/pom.xml" | cut -d' ' -f1)
  if [ "$(cat "$libs/.pom-hash" 2>/dev/null)" != "$pom_hash" ]; then
    log "fetching $name jars from Maven Central"
    rm -rf "$libs"
    mvn -q -B -f "java/$name/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$libs" -DincludeScope=runtime
    echo "$pom_hash" > "$libs/.pom-hash"
  fi
done

# --- HL7 terminology for the FHIR validator ---------------------------------------------------
# R4 (2019) predates codes the pipeline's resources use (v3-ObservationValue#AIAST); HL7's
# terminology release is a FHIR package that the npm registry also serves.
THO_PACKAGE=hl7.terminology.r4@7.0.1
packages=$VAR/fhir-validator/packages
if [ ! -f "$packages/${THO_PACKAGE/@/-}.tgz" ]; then
  log "fetching $THO_PACKAGE"
  mkdir -p "$packages"
  (cd "$packages" && npm pack --silent "$THO_PACKAGE" >/dev/null)
fi

# --- Default model ---------------------------------------------------------------------------
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m training.default_model --repository "$VAR/models"

# --- The chatbot: Rasa's own environment and its trained model ------------------------------
# Rasa 3.6.21 pins numpy/TensorFlow versions the rest of scanwatch has left behind, so it lives in
# .venv-rasa. Rasa declares Python < 3.11; installed from the lock with --no-deps, uv does not
# hold that against it (pip needed --ignore-requires-python, and took minutes where uv's cache
# takes seconds). MPLSETUPCFG: matplotlib 3.5 has no cp311 wheel and builds on Debian's FreeType.
rasa_lock_hash=$(cat chatbot/requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv-rasa/.scanwatch-lock 2>/dev/null)" != "$rasa_lock_hash" ]; then
  log "installing the chatbot's environment (.venv-rasa) from chatbot/requirements.lock"
  [ -x .venv-rasa/bin/python ] || "${UV[@]}" venv --quiet --python "$PYTHON" .venv-rasa
  MPLSETUPCFG=$ROOT/chatbot/mpl-setup.cfg "${UV[@]}" pip install --quiet \
    --python .venv-rasa/bin/python --no-deps -r chatbot/requirements.lock
  echo "$rasa_lock_hash" > .venv-rasa/.scanwatch-lock
fi
# Trains only when config.yml, domain.yml, data/ or the lock changed (the model is named by their
# hash); a model of the same inputs trained earlier on this machine is copied from the cache.
RASA_TELEMETRY_ENABLED=false .venv-rasa/bin/python chatbot/train.py --out "$VAR/chatbot/models" \
  --cache "$CACHE/chatbot-models"

log "ready"

# Sourced by .ci/run: starts what the cache service's fleet tests need, on loopback only, and exports
# where they are. PostgreSQL 15 (Debian) for the index; s3rver (npm) as the S3-compatible blob store: it
# keeps objects on disk and implements multipart uploads, ETags and ranged GETs like S3 itself (moto's
# server keeps everything in memory and is a mock of the API rather than a store). Also the host tools the
# cache tests drive: ccache (remote storage tests), chromium (the web page test). Idempotent.
# Note: sourced, so it runs under the caller's `set -euo pipefail`.

KCI_SERVICES_DIR=${KCI_SERVICES_DIR:-/var/tmp/kernel-ci-services}
mkdir -p "$KCI_SERVICES_DIR"

kci_missing=()
command -v ccache >/dev/null || kci_missing+=(ccache)
command -v chromium >/dev/null || kci_missing+=(chromium)
command -v chromedriver >/dev/null || kci_missing+=(chromium-driver)
[ -x /usr/lib/postgresql/15/bin/postgres ] || kci_missing+=(postgresql)
command -v npm >/dev/null || kci_missing+=(npm)
command -v curl >/dev/null || kci_missing+=(curl)
if [ ${#kci_missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${kci_missing[@]}"
fi

# PostgreSQL: Debian's cluster 15/main listens on localhost only by default; no systemd here.
[ -d /etc/postgresql/15/main ] || pg_createcluster 15 main
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster 15 main start
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
kci_role=$(su postgres -c "psql -tAc \"SELECT count(*) FROM pg_roles WHERE rolname='kci'\"")
[ "$kci_role" = 1 ] || su postgres -c "psql -qc \"CREATE ROLE kci LOGIN PASSWORD 'kci-test'\""
kci_db=$(su postgres -c "psql -tAc \"SELECT count(*) FROM pg_database WHERE datname='kci_cache_test'\"")
[ "$kci_db" = 1 ] || su postgres -c "createdb -O kci kci_cache_test"
export KERNEL_CI_TEST_PG_DSN="postgresql://kci:kci-test@127.0.0.1:5432/kci_cache_test"

# s3rver on 127.0.0.1:4568, objects under $KCI_SERVICES_DIR/s3 (its default credentials: S3RVER/S3RVER).
if ! command -v s3rver >/dev/null; then
    npm install -g --no-fund --no-audit s3rver@3.7.1 >/dev/null
fi
if ! curl -s -o /dev/null http://127.0.0.1:4568/; then
    mkdir -p "$KCI_SERVICES_DIR/s3"
    nohup s3rver -d "$KCI_SERVICES_DIR/s3" -a 127.0.0.1 -p 4568 --silent >"$KCI_SERVICES_DIR/s3rver.log" 2>&1 &
    for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:4568/ && break; sleep 0.2; done
fi
export KERNEL_CI_TEST_S3_ENDPOINT="http://127.0.0.1:4568"
export KERNEL_CI_TEST_S3_KEY_ID="S3RVER" KERNEL_CI_TEST_S3_SECRET="S3RVER"
echo "services: PostgreSQL $KERNEL_CI_TEST_PG_DSN, s3rver $KERNEL_CI_TEST_S3_ENDPOINT"

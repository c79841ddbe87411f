#!/bin/sh
# One Postgres for both services: a database each.
set -e
for db in prefect mlflow; do
  psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -c "CREATE DATABASE $db" || true
done

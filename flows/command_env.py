"""The environment every `shakespeare-gpt` command sets for itself and what it starts
(Prefect's temporary server, a sweep's Dask workers); a user's own setting wins."""

import os

# The temporary Prefect server the CLI starts must not try to send telemetry from an
# offline machine (it logs an error when it cannot)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Nor Prefect's client: it prints a three-line telemetry notice on a terminal's first run
os.environ.setdefault("DO_NOT_TRACK", "1")
# Dask's workers log at INFO on their own stderr (the terminal) unless told otherwise;
# `--verbose` sets it back (`flows.cli.main`)
DASK_LOGGING = "DASK_LOGGING__DISTRIBUTED"
DASK_QUIETED = DASK_LOGGING not in os.environ
os.environ.setdefault(DASK_LOGGING, "error")

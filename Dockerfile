# handoffd on a slim Python image. handoffd is PID 1 here: it reaps orphaned processes (not only its
# workers), forwards nothing blindly, and drains its workers on the container's SIGTERM.
#
#   docker build -t handoffd . && docker run --rm -p 8080:8080 handoffd
#   docker exec <container> handoffd upgrade --config /etc/handoffd/handoffd.toml
#
# Stopping: `docker stop` sends STOPSIGNAL, then SIGKILL after --time (default 10 s), which must
# exceed the config's drain_timeout plus a margin: config/docker.toml drains for 8 s. For longer
# drains raise both: `docker run --stop-timeout 40` / `docker stop --time 40` (compose:
# stop_grace_period) with drain_timeout = 30.

# The same layout as the systemd unit: handoffd in a venv at /opt/handoffd, built in a stage of its
# own so that the sources and pip's build files stay out of the image.
FROM python:3.11-slim AS build
COPY pyproject.toml README.md /src/
COPY handoff /src/handoff
RUN python -m venv /opt/handoffd && /opt/handoffd/bin/pip install --no-cache-dir /src

FROM python:3.11-slim
COPY --from=build /opt/handoffd /opt/handoffd
# An unprivileged user for handoffd and its workers, and the runtime dir (config/docker.toml's
# runtime_dir) it owns: handoffd refuses a runtime dir another uid could replace. USER is numeric
# so that Kubernetes' runAsNonRoot can check it without reading the image's /etc/passwd.
RUN groupadd --system --gid 10001 handoffd \
    && useradd --system --uid 10001 --gid handoffd --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin handoffd \
    && install -d -o handoffd -g handoffd -m 0700 /run/handoffd
COPY config/docker.toml /etc/handoffd/handoffd.toml
ENV PATH=/opt/handoffd/bin:$PATH
USER 10001:10001

EXPOSE 8080
# handoffd's graceful stop: drain every worker (stop_signal, drain_timeout), then exit.
STOPSIGNAL SIGTERM
# `handoffd status` exits 0 while the current generation serves, 4 when it does not (crash loop,
# starting, stopping), 3 when handoffd cannot be reached: docker counts any non-zero as unhealthy.
# start-period covers generation 1's ready_timeout.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["handoffd", "status", "--config", "/etc/handoffd/handoffd.toml"]
ENTRYPOINT ["handoffd", "run"]
CMD ["--config", "/etc/handoffd/handoffd.toml"]

# handoffd on a slim Python image. handoffd is PID 1 here: it reaps orphaned processes (not only its
# workers), forwards nothing blindly, and drains its workers on the container's SIGTERM.
#
#   docker build -t handoffd . && docker run --rm -p 8080:8080 handoffd
#   docker exec <container> handoffd upgrade --config /etc/handoffd/handoffd.toml
FROM python:3.11-slim

WORKDIR /opt/handoffd
COPY pyproject.toml README.md ./
COPY handoff ./handoff
RUN pip install --no-cache-dir . && mkdir -p /etc/handoffd
COPY config/docker.toml /etc/handoffd/handoffd.toml

EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["handoffd", "run"]
CMD ["--config", "/etc/handoffd/handoffd.toml"]

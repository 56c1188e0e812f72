# Stand-in for python:3.11.x-slim-bookworm: Debian's python3.11 on the debootstrap base, at the
# paths the official image uses (/usr/local/bin/python3.11, python3, python), plus the machine's
# extra certificate authorities (a TLS-intercepting proxy may sit between a build and PyPI).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && update-ca-certificates \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python3.11 \
    && ln -s python3.11 /usr/local/bin/python3 \
    && ln -s python3.11 /usr/local/bin/python
# uv reads the system store only through SSL_CERT_FILE (its default roots are built in).
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["python3"]

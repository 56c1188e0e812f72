# Stand-in for prom/prometheus: Debian's prometheus binary (from its .deb, unpacked) on the
# debootstrap base, laid out as in the official image: /bin/prometheus as the entrypoint, the
# configuration in /etc/prometheus, the data in /prometheus, run as nobody.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY prometheus /bin/prometheus
COPY prometheus.yml /etc/prometheus/prometheus.yml
RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

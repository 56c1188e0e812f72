# Stand-in for ghcr.io/astral-sh/uv: the uv and uvx binaries of the PyPI `uv` wheel, at / as in
# the official image (deploy/Dockerfile copies /uv from it).
FROM scratch
COPY uv uvx /
ENTRYPOINT ["/uv"]

# spendgate control plane and ext_proc (one image, two commands).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY spendgate ./spendgate
COPY control_plane ./control_plane
COPY ext_proc ./ext_proc
COPY proto ./proto
COPY envoy ./envoy
RUN pip install --no-cache-dir .
USER nobody

# spendgate control plane and ext_proc (one image, two commands).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY spendgate ./spendgate
COPY control_plane ./control_plane
COPY ext_proc ./ext_proc
COPY proto ./proto
COPY envoy ./envoy
RUN pip install --no-cache-dir . \
 && mkdir -p /var/lib/spendgate && chown nobody /var/lib/spendgate
# ext_proc's usage journal (docs/concepts/request-flow.md "Usage is never lost"): mount a volume here.
ENV SPENDGATE_EXT_PROC_JOURNAL_DIR=/var/lib/spendgate/ext_proc-{port}
USER nobody

# An etcd image from Debian's etcd binaries (scripts/build-images.sh copies /usr/bin/etcd and
# /usr/bin/etcdctl into CONTEXT):
#   docker build -f cluster-configs/etcd.Dockerfile -t llm-cluster/etcd CONTEXT
ARG BASE=debian:bookworm-slim
FROM ${BASE}
COPY etcd etcdctl /usr/local/bin/
RUN mkdir -p /var/lib/etcd && chown 65532:65532 /var/lib/etcd
USER 65532:65532
WORKDIR /var/lib/etcd
ENV ETCD_DATA_DIR=/var/lib/etcd/data
EXPOSE 2379 2380
HEALTHCHECK --interval=5s --timeout=4s --start-period=20s --retries=3 \
  CMD ["etcdctl", "--endpoints=http://127.0.0.1:2379", "--command-timeout=3s", "endpoint", "health"]
ENTRYPOINT ["etcd"]

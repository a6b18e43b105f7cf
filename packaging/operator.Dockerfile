# syntax=docker/dockerfile:1
# darkcore-operator: docker build -f packaging/operator.Dockerfile -t darkcore-operator .
# Stage 1 builds the release binary; stage 2 is distroless (glibc, CA roots, no shell), and the
# operator runs as the unprivileged user 65532 with a read-only root filesystem (the chart's
# securityContext). It writes nothing to disk: its state lives in the Kubernetes API.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p darkcore-operator \
 && install -D -m 0755 target/release/darkcore-operator /out/darkcore-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/darkcore-operator /usr/local/bin/darkcore-operator
USER 65532:65532
# 7443: the agent gateway; 8080: /healthz, /readyz, /metrics; 10250: the kubelet API.
EXPOSE 7443 8080 10250
ENTRYPOINT ["/usr/local/bin/darkcore-operator"]
CMD ["run"]

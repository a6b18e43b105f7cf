# syntax=docker/dockerfile:1
# darkcore-agent in a container: docker build -f packaging/agent.Dockerfile -t darkcore-agent .
# For devices that already run containers and give only WebAssembly: the agent runs as the
# unprivileged user 65532, so it offers `wasm` (and `process` if the owner lists it), never
# `oci`, which needs root and runc on the host; use the Debian package for that.
#   docker run -d --restart=unless-stopped -v darkcore:/var/lib/darkcore \
#     -v /etc/darkcore:/etc/darkcore:ro darkcore-agent run
# Join once first: docker run --rm -v darkcore:/var/lib/darkcore darkcore-agent \
#     join --server HOST:PORT --token TOKEN
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile agent-release --locked -p darkcore-agent \
 && install -D -m 0755 target/agent-release/darkcore-agent /out/darkcore-agent \
 && install -d -o 65532 -g 65532 -m 0700 /out/state

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/darkcore-agent /usr/local/bin/darkcore-agent
COPY --from=build --chown=65532:65532 /out/state /var/lib/darkcore
USER 65532:65532
VOLUME ["/var/lib/darkcore"]
ENTRYPOINT ["/usr/local/bin/darkcore-agent"]
CMD ["run"]
